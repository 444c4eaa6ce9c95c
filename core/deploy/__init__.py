"""Data-only packages: systemd units and mosquitto configs shipped with fleetpipe."""

__all__: list[str] = []
