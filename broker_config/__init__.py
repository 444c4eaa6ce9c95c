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
    """Return a shipped config with ``{key}`` placeholders replaced."""
    text = resources.files(__name__).joinpath(name).read_text()
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    return text
