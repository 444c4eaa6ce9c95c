"""Transport: move (topic, bytes) between processes."""

__all__: list[str] = []
