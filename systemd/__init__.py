"""systemd unit files (data only)."""

__all__: list[str] = []
