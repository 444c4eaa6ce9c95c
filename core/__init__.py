"""fleetpipe: one neural network, pipelined across a heterogeneous edge fleet over MQTT."""

__version__ = "0.1.0"

__all__ = ["__version__"]
