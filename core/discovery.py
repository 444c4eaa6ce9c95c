"""Zeroconf discovery of a fleet's broker, planner and nodes, with a static fallback.

Theory of operation: every fleetpipe process may advertise one ``_fleetpipe._tcp.local.`` service whose
TXT record carries ``fleet``, ``node`` (its id), ``role`` (node | planner | broker), ``wire`` and, when
known, ``broker`` (the broker URL), plus a random ``instance`` token that tells two processes apart.
mosquitto does not announce itself, so ``fleetpipe broker announce`` advertises it for the fleet;
standard ``_mqtt._tcp`` / ``_secure-mqtt._tcp`` services are accepted as fleet-less brokers too.

Discovery only *finds*: liveness comes from MQTT birth/death and health, because a crashed process stays
advertised in mDNS for a long time. Fleets never mix: browse results are filtered by the ``fleet``
property. Two live adverts with the same fleet, role and id but different instance tokens are a
duplicate id: :class:`Announcer` refuses to register a node whose id is already advertised, and
:func:`browse` marks both adverts ``duplicate``.

:func:`resolve_broker` turns a config without ``broker.url`` into one with it: browse for the fleet's
brokers and take the first that accepts a TCP connection, else the first reachable
``broker.static_fallback`` entry (for networks that block multicast), else raise DiscoveryError.

Tests pass ``interfaces=["127.0.0.1"]`` (or addresses inside network namespaces they created) so that no
multicast leaves the test host. zeroconf is imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from fleetpipe._compat import wait_for
from fleetpipe.config import BrokerConfig, validate_name
from fleetpipe.errors import DiscoveryError

if TYPE_CHECKING:
    from typing import Self

    from zeroconf import ServiceInfo
    from zeroconf.asyncio import AsyncZeroconf

__all__ = [
    "MQTT_SERVICE_TYPES",
    "ROLES",
    "SERVICE_TYPE",
    "WIRE",
    "Announcer",
    "Found",
    "async_browse",
    "async_resolve_broker",
    "browse",
    "resolve_broker",
]

SERVICE_TYPE = "_fleetpipe._tcp.local."
# Standard broker service types; their adverts have no fleet unless they carry a ``fleet`` TXT property.
MQTT_SERVICE_TYPES: Mapping[str, str] = {"_mqtt._tcp.local.": "mqtt", "_secure-mqtt._tcp.local.": "mqtts"}
ROLES = ("node", "planner", "broker")
WIRE = "1"
# How long an Announcer browses for an already advertised node id before registering. Over 1 s on purpose:
# a responder multicasts a record at most once a second (RFC 6762 s. 6), so when another browse (this
# process's own broker lookup, say) was just answered, only the browser's second query (~1 s in) gets a reply.
DUPLICATE_CHECK_S = 2.0
# Per-address TCP connect timeout when checking that a broker is healthy.
CONNECT_TIMEOUT_S = 0.5

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Found:
    """One advert seen on the network."""

    role: str
    name: str
    fleet: str | None
    addresses: tuple[str, ...]
    port: int
    properties: dict[str, str] = field(hash=False)
    instance: str | None
    service: str
    service_type: str = SERVICE_TYPE
    duplicate: bool = False

    @property
    def broker_url(self) -> str | None:
        """The advertised broker URL (``broker`` property, or the address of a broker advert)."""
        urls = _broker_urls(self)
        return urls[0] if urls else None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``fleetpipe discover --json``)."""
        out = dataclasses.asdict(self)
        out["addresses"] = list(self.addresses)
        out["broker_url"] = self.broker_url
        return out


class Announcer:
    """Advertise one fleetpipe service while the (async or sync) context is open.

    Before a ``node`` registers, the announcer browses for ``duplicate_check_s`` and raises
    DiscoveryError if another process already advertises the same node id in the same fleet.
    """

    def __init__(self, role: str, name: str, fleet: str, port: int,
                 properties: Mapping[str, str] | None = None, *, interfaces: Sequence[str] | None = None,
                 addresses: Sequence[str] | None = None, duplicate_check_s: float | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        self.role = role
        self.name = validate_name("name", name)
        self.fleet = validate_name("fleet", fleet)
        self.port = port
        self.interfaces = _interface_addresses(interfaces)
        self.instance = secrets.token_hex(4)
        self.duplicate_check_s = DUPLICATE_CHECK_S if duplicate_check_s is None else duplicate_check_s
        self.properties: dict[str, str] = {
            **{str(k): str(v) for k, v in (properties or {}).items()},
            "fleet": fleet, "node": name, "role": role, "wire": WIRE, "instance": self.instance,
        }
        self.addresses = tuple(addresses) if addresses else (self.interfaces or _host_addresses())
        label = f"{name} ({role}, {fleet})".replace(".", "-")[:53]
        self.service = f"{label} {self.instance}.{SERVICE_TYPE}"
        self._aiozc: AsyncZeroconf | None = None
        self._info: ServiceInfo | None = None
        self._started_at = 0.0
        self.registered_in_s: float | None = None

    async def __aenter__(self) -> Self:
        from zeroconf.asyncio import AsyncZeroconf

        self._aiozc = AsyncZeroconf(interfaces=_zc_interfaces(self.interfaces))
        try:
            await self._async_start()
        except BaseException:
            await self._aiozc.async_close()
            self._aiozc = None
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        aiozc, self._aiozc = self._aiozc, None
        if aiozc is not None:
            await aiozc.async_close()  # unregisters (goodbye packets) then closes

    def __enter__(self) -> Self:
        from zeroconf import Zeroconf
        from zeroconf.asyncio import AsyncZeroconf

        _require_no_running_loop("Announcer (use `async with` inside a running event loop)")
        zc = Zeroconf(interfaces=_zc_interfaces(self.interfaces))  # runs on zeroconf's own loop thread
        self._aiozc = AsyncZeroconf(zc=zc)
        try:
            assert zc.loop is not None
            asyncio.run_coroutine_threadsafe(self._async_start(), zc.loop).result(self.duplicate_check_s + 30)
        except BaseException:
            zc.close()
            self._aiozc = None
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        aiozc, self._aiozc = self._aiozc, None
        if aiozc is not None:
            aiozc.zeroconf.close()  # the sync close unregisters everything first

    async def _async_start(self) -> None:
        from zeroconf import ServiceInfo

        assert self._aiozc is not None
        self._started_at = time.monotonic()
        if self.role == "node" and self.duplicate_check_s > 0:
            others = await _collect(self._aiozc, fleet=self.fleet, timeout_s=self.duplicate_check_s,
                                    types=(SERVICE_TYPE,), stop=self._is_duplicate)
            dup = next((f for f in others if self._is_duplicate_sync(f)), None)
            if dup is not None:
                raise DiscoveryError(
                    f"duplicate node id {self.name!r} in fleet {self.fleet!r}: already advertised by "
                    f"{', '.join(dup.addresses) or '?'} (instance {dup.instance}); "
                    "give each node a unique name")
        self._info = ServiceInfo(
            SERVICE_TYPE, self.service, port=self.port, properties=self.properties,
            server=f"fleetpipe-{self.instance}.local.",
            addresses=[ipaddress.ip_address(a).packed for a in self.addresses],
        )
        try:
            # No probing (cooperating_responders): the instance token makes service and host names unique,
            # and duplicate *ids* are checked above; probing would add ~0.7 s to every start.
            await (await self._aiozc.async_register_service(self._info, cooperating_responders=True))
        except Exception as exc:
            raise DiscoveryError(f"cannot register {self.service!r}: {exc}") from exc
        self.registered_in_s = time.monotonic() - self._started_at
        log.info("announced %s %r in fleet %r on %s port %d (%.2f s)", self.role, self.name, self.fleet,
                 ", ".join(self.addresses), self.port, self.registered_in_s)

    def _is_duplicate_sync(self, found: Found) -> bool:
        return (found.fleet == self.fleet and found.role == self.role and found.name == self.name
                and found.instance != self.instance)

    async def _is_duplicate(self, found: Found) -> bool:
        return self._is_duplicate_sync(found)


def browse(fleet: str | None = None, timeout_s: float = 2.0,
           interfaces: Sequence[str] | None = None) -> list[Found]:
    """Browse for ``timeout_s`` and return fleetpipe and MQTT adverts (of ``fleet`` if given)."""
    _require_no_running_loop("browse (use async_browse inside a running event loop)")
    return asyncio.run(async_browse(fleet, timeout_s, interfaces))


async def async_browse(fleet: str | None = None, timeout_s: float = 2.0,
                       interfaces: Sequence[str] | None = None) -> list[Found]:
    """Async :func:`browse`; duplicates (same fleet, role and id, other instance) are marked."""
    from zeroconf.asyncio import AsyncZeroconf

    aiozc = AsyncZeroconf(interfaces=_zc_interfaces(_interface_addresses(interfaces)))
    try:
        found = await _collect(aiozc, fleet=fleet, timeout_s=timeout_s,
                               types=(SERVICE_TYPE, *MQTT_SERVICE_TYPES))
    finally:
        await aiozc.async_close()
    return _mark_duplicates(found)


class _HasBroker(Protocol):
    @property
    def fleet(self) -> str: ...
    @property
    def broker(self) -> BrokerConfig: ...


C = TypeVar("C", bound=_HasBroker)


def resolve_broker(config: C, *, timeout_s: float = 3.0, interfaces: Sequence[str] | None = None) -> C:
    """Return ``config`` with ``broker.url`` set: as given, discovered, or from ``static_fallback``."""
    if config.broker.url:
        return config
    _require_no_running_loop("resolve_broker (use async_resolve_broker inside a running event loop)")
    return asyncio.run(async_resolve_broker(config, timeout_s=timeout_s, interfaces=interfaces))


async def async_resolve_broker(config: C, *, timeout_s: float = 3.0,
                               interfaces: Sequence[str] | None = None) -> C:
    """Async :func:`resolve_broker`."""
    if config.broker.url:
        return config
    from zeroconf.asyncio import AsyncZeroconf

    fleet = config.fleet
    started = time.monotonic()
    chosen: list[str] = []
    generic: list[Found] = []
    tried: set[str] = set()

    async def healthy(found: Found) -> bool:
        if found.role != "broker" or found.fleet not in (fleet, None):
            return False
        if found.fleet is None:  # a plain _mqtt._tcp broker: only if the fleet has none of its own
            generic.append(found)
            return False
        url = await _first_reachable(_broker_urls(found), tried)
        if url:
            chosen.append(url)
        return url is not None

    aiozc = AsyncZeroconf(interfaces=_zc_interfaces(_interface_addresses(interfaces)))
    try:
        await _collect(aiozc, fleet=fleet, timeout_s=timeout_s,
                       types=(SERVICE_TYPE, *MQTT_SERVICE_TYPES), stop=healthy)
    finally:
        await aiozc.async_close()
    for found in generic:
        if not chosen and (url := await _first_reachable(_broker_urls(found), tried)):
            chosen.append(url)
    elapsed = time.monotonic() - started
    if chosen:
        log.info("broker %s for fleet %r found by zeroconf in %.2f s", chosen[0], fleet, elapsed)
        return _with_url(config, chosen[0])
    fallback = config.broker.static_fallback
    url = await _first_reachable(fallback, tried) if fallback else None
    if url:
        log.warning("no broker for fleet %r found by zeroconf within %.1f s; using static fallback %s",
                    fleet, timeout_s, url)
        return _with_url(config, url)
    seen = f"; tried {', '.join(sorted(tried))} (unreachable)" if tried else ""
    hint = "" if fallback else "; set [broker] static_fallback in the config file"
    raise DiscoveryError(
        f"no broker for fleet {fleet!r}: zeroconf found none within {timeout_s:g} s{seen}{hint}, "
        "or pass --broker mqtt://host:port")


# --- private helpers --------------------------------------------------------------------------------


def _with_url(config: C, url: str) -> C:
    broker = dataclasses.replace(config.broker, url=url)
    return dataclasses.replace(config, broker=broker)  # type: ignore[type-var]


def _require_no_running_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"{what} cannot run inside a running event loop")


async def _collect(aiozc: AsyncZeroconf, *, fleet: str | None, timeout_s: float, types: Sequence[str],
                   stop: Callable[[Found], Awaitable[bool]] | None = None) -> list[Found]:
    """Browse ``types`` until ``timeout_s`` passes or ``stop(found)`` is true; latest advert per service."""
    from zeroconf import DNSQuestionType, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

    _QM = DNSQuestionType.QM

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    results: asyncio.Queue[Found] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()

    async def resolve(service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        wait_ms = max(100.0, min(3000.0, (deadline - loop.time()) * 1000))
        try:
            if await info.async_request(aiozc.zeroconf, wait_ms, question_type=_QM):
                results.put_nowait(_to_found(service_type, info))
        except Exception as exc:  # a malformed advert from the network is dropped, never raised
            log.debug("cannot resolve %s: %s", name, exc)

    def on_change(zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            task = loop.create_task(resolve(service_type, name))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    # QM (multicast-response) questions from the start. zeroconf's default first question is QU: the answer
    # comes back unicast to port 5353, which every responder on the host shares (SO_REUSEPORT; avahi, other
    # fleetpipe processes), so the kernel hands it to one of them, usually not us, and the first answer only
    # arrives with the next (QM) query ~1 s later. Measured on loopback: 0.09 s instead of 1.1 s.
    browser = AsyncServiceBrowser(aiozc.zeroconf, list(types), handlers=[on_change], question_type=_QM)
    found: dict[str, Found] = {}
    try:
        while (remaining := deadline - loop.time()) > 0:
            try:
                item = await wait_for(results.get(), remaining)
            except TimeoutError:
                break
            if fleet is not None and item.fleet not in (fleet, None):
                continue  # fleets never mix; fleet-less MQTT brokers are candidates for any fleet
            found[item.service] = item
            if stop is not None and await stop(item):
                break
    finally:
        await browser.async_cancel()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return sorted(found.values(), key=lambda f: (ROLES.index(f.role), f.fleet or "", f.name, f.service))


def _to_found(service_type: str, info: Any) -> Found:
    props = {k: v for k, v in info.decoded_properties.items() if v is not None}
    label = info.name.removesuffix("." + service_type)
    if service_type == SERVICE_TYPE:
        role = props.get("role", "node")
        name = props.get("node", label)
        fleet = props.get("fleet")
        instance = props.get("instance")
    else:
        role, name, fleet, instance = "broker", label, props.get("fleet"), props.get("instance")
    return Found(role=role if role in ROLES else "node", name=name, fleet=fleet,
                 addresses=tuple(info.parsed_scoped_addresses()), port=int(info.port or 0),
                 properties=props, instance=instance, service=info.name, service_type=service_type)


def _mark_duplicates(found: list[Found]) -> list[Found]:
    instances: dict[tuple[str | None, str, str], set[str | None]] = {}
    for f in found:
        instances.setdefault((f.fleet, f.role, f.name), set()).add(f.instance)
    return [dataclasses.replace(f, duplicate=f.service_type == SERVICE_TYPE
                                and len(instances[(f.fleet, f.role, f.name)]) > 1) for f in found]


def _broker_urls(found: Found) -> list[str]:
    """Candidate broker URLs of an advert, best first (a loopback TXT URL only for a loopback advert)."""
    from fleetpipe.transport._url import BrokerUrl, parse_broker_url

    scheme = MQTT_SERVICE_TYPES.get(found.service_type, "mqtt")
    port = found.port
    urls: list[str] = []
    if found.properties.get("broker"):
        try:
            url = parse_broker_url(found.properties["broker"])
        except ValueError:
            url = None
        if url is not None:
            scheme, port = url.scheme, url.port
            if not _is_local(url.host) or all(_is_local(a) for a in found.addresses):
                urls.append(str(url))
    elif found.role != "broker":
        return []
    for addr in found.addresses:
        if ipaddress.ip_address(addr.split("%")[0]).is_link_local and ":" in addr:
            continue  # scoped IPv6 link-local cannot go into a URL
        urls.append(str(BrokerUrl(scheme, addr, port)))
    return list(dict.fromkeys(urls))


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


async def _first_reachable(urls: Sequence[str], tried: set[str]) -> str | None:
    """The first URL whose host accepts a TCP connection within CONNECT_TIMEOUT_S."""
    from fleetpipe.transport._url import parse_broker_url

    for raw in urls:
        try:
            url = parse_broker_url(raw)
        except ValueError as exc:
            log.warning("ignoring bad broker URL %r: %s", raw, exc)
            continue
        tried.add(str(url))
        try:
            _, writer = await wait_for(asyncio.open_connection(url.host, url.port), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            log.info("broker %s is not reachable: %s", url, exc or "timeout")
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return str(url)
    return None


def _interface_addresses(interfaces: Sequence[str] | None) -> list[str] | None:
    """IP addresses for ``interfaces`` given as IP addresses or interface names (eth0)."""
    if not interfaces:
        return None
    out: list[str] = []
    adapters = None
    for item in interfaces:
        try:
            out.append(str(ipaddress.ip_address(item)))
            continue
        except ValueError:
            pass
        if adapters is None:
            import ifaddr

            adapters = {a.nice_name: a for a in ifaddr.get_adapters()}
        adapter = adapters.get(item)
        if adapter is None:
            known = sorted(adapters)
            raise DiscoveryError(f"unknown interface {item!r} (give an IP address or one of {known})")
        out.extend(str(ip.ip) for ip in adapter.ips if isinstance(ip.ip, str))
    return out


def _zc_interfaces(addresses: list[str] | None) -> Any:
    from zeroconf import InterfaceChoice

    return addresses if addresses else InterfaceChoice.All


def _host_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this host (loopback when there is none)."""
    import ifaddr

    addrs = [str(ip.ip) for a in ifaddr.get_adapters() for ip in a.ips
             if isinstance(ip.ip, str) and not ip.ip.startswith("127.")]
    return addrs or ["127.0.0.1"]

