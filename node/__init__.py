"""fleetpipe.node."""

__all__: list[str] = []
