"""Inference runtimes for stage slices."""

__all__: list[str] = []
