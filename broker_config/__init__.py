"""mosquitto configuration files (data only).

``lab.conf`` is a template: ``{port}`` and ``{bind}`` are filled in by :func:`render`.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["path", "render"]


def path(name: str) -> str:
    """Filesystem path of a shipped config file."""
    return str(resources.files(__name__).joinpath(name))


def render(name: str, **values: object) -> str:
    """Return a shipped config with ``{key}`` placeholders replaced.

    ``{max_packet_size}`` defaults to ``fleetpipe.wire.MAX_PACKET_BYTES``, the limit every fleetpipe client
    announces, so the broker and the nodes agree on one bound.
    """
    from fleetpipe.wire import MAX_PACKET_BYTES

    values = {"max_packet_size": MAX_PACKET_BYTES, **values}
    text = resources.files(__name__).joinpath(name).read_text()
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    return text
