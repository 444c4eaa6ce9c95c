"""Broker URLs: ``mqtt://host[:port]`` (plain TCP, default 1883) and ``mqtts://host[:port]`` (TLS, 8883)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["BrokerUrl", "parse_broker_url"]

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    """A parsed broker address."""

    scheme: str
    host: str
    port: int

    def __post_init__(self) -> None:
        if self.scheme not in _DEFAULT_PORTS:
            raise ValueError(f"broker URL scheme must be mqtt or mqtts, got {self.scheme!r}")
        if not self.host:
            raise ValueError("broker URL has no host")
        if not 0 < self.port < 65536:
            raise ValueError(f"broker port out of range: {self.port}")

    @property
    def tls(self) -> bool:
        """True for ``mqtts://``."""
        return self.scheme == "mqtts"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_broker_url(url: str | BrokerUrl) -> BrokerUrl:
    """Parse ``mqtt://host:port`` / ``mqtts://host:port``; raise ValueError on anything else."""
    if isinstance(url, BrokerUrl):
        return url
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"broker URL must look like mqtt://host:port, got {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"broker URL scheme must be mqtt or mqtts, got {url!r}")
    if parts.username or parts.password:
        raise ValueError("put credentials in username/password, not in the broker URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URL may not have a path, query or fragment: {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in broker URL {url!r}") from exc
    return BrokerUrl(scheme, parts.hostname or "", port or _DEFAULT_PORTS[scheme])
