"""Re-export of :mod:`fleetpipe.context` (the COACH semantic cache lives in core: calibration uses it too)."""

from fleetpipe.context import MIN_CODEC_BITS, ExitDecision, SemanticCache, separability

__all__ = ["MIN_CODEC_BITS", "ExitDecision", "SemanticCache", "separability"]
