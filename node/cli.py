"""``fleetpipe node``: run a node daemon."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["build_config", "main", "register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``node`` subcommand."""
    p = subparsers.add_parser("node", help="run a node daemon (runs its stage of the pipeline)")
    p.add_argument("--broker", help="mqtt://host:port (default: config file, FLEETPIPE_BROKER_URL)")
    p.add_argument("--name", help="node id, unique in the fleet (default: host name)")
    p.add_argument("--fleet", help="fleet name (default: 'default')")
    p.add_argument("--emulate", help="emulate a device class: rpi3, rpi4, rpi5, jetson-nano, x86, or a factor; "
                   "optional ':bw=MBPS,mem=BYTES'")
    p.add_argument("--config", help="TOML config file (e.g. /etc/fleetpipe/node.toml)")
    p.add_argument("--cache-dir", dest="cache_dir", help="content-addressed slice cache")
    p.add_argument("--threads", type=int, help="inference threads")
    p.add_argument("--username", dest="broker_username", help="MQTT username (secure broker)")
    p.add_argument("--password-file", dest="broker_password_file", help="file holding the broker password")
    p.add_argument("--ca-certs", dest="broker_ca_certs", help="CA bundle: enables TLS")
    p.add_argument("--interface", dest="interfaces", action="append",
                   help="zeroconf: browse/advertise only on this interface or address (repeatable)")
    p.add_argument("--no-announce", dest="announce", action="store_false", default=None,
                   help="do not advertise this node with zeroconf")
    p.add_argument("--fixed-bits", dest="adaptive_bits", action="store_false", default=None,
                   help="always send at the assigned bit-width (no online adaptation)")
    p.add_argument("--no-profile-report", dest="report_profile", action="store_false", default=None,
                   help="do not time the layers of loaded slices for the planner (it then scales its own profile)")
    p.set_defaults(func=run)
    from fleetpipe.cliargs import config_defaults
    from fleetpipe.config import NodeConfig

    p.config_defaults = config_defaults(NodeConfig, {"name": "the host name",
                                                     "broker_url": "config file, else zeroconf"})


def build_config(args: argparse.Namespace, env: Mapping[str, str]) -> Any:
    """The NodeConfig from flags > ``FLEETPIPE_*`` env > ``--config`` file > defaults (host name as name)."""
    from fleetpipe.config import NodeConfig, load

    keys = ("name", "fleet", "emulate", "cache_dir", "threads", "broker_username", "broker_password_file",
            "broker_ca_certs", "announce", "adaptive_bits", "report_profile")
    flags = {k: getattr(args, k, None) for k in keys}
    flags["interfaces"] = tuple(args.interfaces) if args.interfaces else None
    flags["broker_url"] = args.broker
    # The host name is a default: the config file's name, FLEETPIPE_NAME and --name all beat it.
    defaults = {"name": socket.gethostname().split(".")[0] or "node"}
    return load(NodeConfig, file=args.config, env=env, flags=flags, defaults=defaults)


def run(args: argparse.Namespace) -> int:
    """Build the NodeConfig from file, env and flags, and run the daemon."""
    from fleetpipe.errors import ConfigError, FleetpipeError
    from fleetpipe.node.daemon import EXIT_CONFIG, NodeDaemon

    try:
        config = build_config(args, dict(os.environ))
    except (ConfigError, TypeError) as exc:
        print(f"fleetpipe node: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not config.broker.url:
        from fleetpipe.discovery import resolve_broker

        try:
            config = resolve_broker(config, interfaces=config.interfaces or None)
        except FleetpipeError as exc:
            print(f"fleetpipe node: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    return NodeDaemon(config).run()


def main(argv: list[str] | None = None) -> int:
    """``python -m fleetpipe.node``."""
    from fleetpipe.cli import main as cli_main

    return cli_main(["node", *(argv if argv is not None else sys.argv[1:])])
