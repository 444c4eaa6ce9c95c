"""``fleetpipe discover`` and ``fleetpipe broker announce``.

``broker`` is a subcommand group: other modules add their own ``fleetpipe broker <verb>`` through
:func:`broker_subparsers`, which creates the group once and returns its sub-action. Cheap to import:
zeroconf and rich are imported when a command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetpipe.discovery import Found

__all__ = ["broker_subparsers", "register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``discover`` and ``broker announce`` to the ``fleetpipe`` command."""
    p = subparsers.add_parser("discover", help="list the nodes, planners and brokers zeroconf sees",
                              description="List the nodes, planners and brokers advertised on the network.")
    p.add_argument("--fleet", help="only this fleet (fleet-less _mqtt._tcp brokers are always listed)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=2.0, metavar="S", help="browse this long (default 2 s)")
    _add_interface_flag(p)
    p.set_defaults(func=_discover)

    broker = broker_subparsers(subparsers)
    a = broker.add_parser("announce", help="advertise a broker for a fleet until Ctrl-C/SIGTERM",
                          description="Advertise an MQTT broker (mosquitto does not announce itself).")
    a.add_argument("--url", required=True, help="the broker URL, e.g. mqtt://192.168.1.10:1883")
    a.add_argument("--fleet", required=True, help="the fleet this broker serves")
    a.add_argument("--name", help="advert name (default: this host's name)")
    _add_interface_flag(a)
    a.set_defaults(func=_announce)


def broker_subparsers(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The sub-action of the ``fleetpipe broker`` group, creating the group on first use."""
    parser = subparsers.choices.get("broker")
    if parser is None:
        parser = subparsers.add_parser("broker", help="broker helpers (announce, ...)",
                                       description="Helpers for the fleet's MQTT broker.")
        parser.set_defaults(func=lambda args: _group_help(parser))
        return parser.add_subparsers(dest="broker_command", metavar="BROKER_COMMAND")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest="broker_command", metavar="BROKER_COMMAND")


# --- private helpers --------------------------------------------------------------------------------


def _add_interface_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interface", action="append", metavar="IP|NAME",
                   help="use only this interface (IP address or name; repeatable; default: all)")


def _group_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _discover(args: argparse.Namespace) -> int:
    from fleetpipe.discovery import browse
    from fleetpipe.errors import FleetpipeError

    try:
        found = browse(args.fleet, args.timeout, args.interface)
    except (FleetpipeError, OSError) as exc:
        print(f"fleetpipe discover: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([f.to_json() for f in found], indent=2))
        return 0
    _print_table(found, args.timeout)
    return 0


def _print_table(found: list[Found], timeout_s: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not found:
        console.print(f"nothing found within {timeout_s:g} s")
        return
    table = Table("role", "name", "fleet", "address", "port", "broker URL", "note")
    for f in found:
        note = "[bold red]DUPLICATE ID[/]" if f.duplicate else ""
        table.add_row(f.role, f.name, f.fleet or "-", ", ".join(f.addresses), str(f.port),
                      f.broker_url or "", note)
    console.print(table)
    if any(f.duplicate for f in found):
        console.print("[bold red]duplicate ids:[/] two processes advertise the same fleet/role/name")


def _announce(args: argparse.Namespace) -> int:
    from fleetpipe.errors import FleetpipeError
    from fleetpipe.transport._url import parse_broker_url

    try:
        url = parse_broker_url(args.url)
    except ValueError as exc:
        print(f"fleetpipe broker announce: {exc}", file=sys.stderr)
        return 2
    name = args.name or (socket.gethostname().split(".")[0] or "broker")
    try:
        return asyncio.run(_announce_until_signal(str(url), url.host, url.port, name, args))
    except (FleetpipeError, ValueError, OSError) as exc:
        print(f"fleetpipe broker announce: {exc}", file=sys.stderr)
        return 1


async def _announce_until_signal(url: str, host: str, port: int, name: str, args: argparse.Namespace) -> int:
    import ipaddress

    from fleetpipe.discovery import Announcer

    addresses: list[str] | None = None
    try:  # a broker bound to one specific address is advertised on that address
        ip = ipaddress.ip_address(host)
        if not ip.is_unspecified and (not ip.is_loopback or args.interface):
            addresses = [host]
    except ValueError:
        pass
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Announcer("broker", name, args.fleet, port, {"broker": url},
                             interfaces=args.interface, addresses=addresses) as ann:
            print(f"announcing broker {url} for fleet {args.fleet!r} as {ann.service!r} "
                  f"on {', '.join(ann.addresses)}; Ctrl-C to stop", flush=True)
            await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0
