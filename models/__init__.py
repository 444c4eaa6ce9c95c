"""fleetpipe.models."""

__all__: list[str] = []
