"""fleetpipe.planner."""

__all__: list[str] = []
