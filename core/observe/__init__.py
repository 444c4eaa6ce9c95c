"""Observability: ``fleetpipe top``, ``timeline``, ``exporter`` and ``ha-discovery``, plus :func:`timeline_png`.

Everything here reads the fleet's MQTT topics (layout and metric keys in :mod:`fleetpipe.metrics`) and
never publishes to them, except ``ha-discovery``, which writes retained Home Assistant discovery configs
under ``homeassistant/``. Importing this module is cheap: rich, matplotlib and prometheus_client are
imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register", "timeline_png"]


def register(subparsers: Any) -> None:
    """Add the ``top``, ``timeline``, ``exporter`` and ``ha-discovery`` subcommands."""
    p = subparsers.add_parser("top", help="live terminal view of a fleet",
                              description="Watch a fleet: nodes, plan stages, utilisation, bubbles, errors.")
    _common(p)
    p.add_argument("--interval", type=float, default=1.0, help="refresh period in seconds (default 1)")
    p.add_argument("--once", action="store_true",
                   help="collect for max(--interval, 3 health intervals = 3 s), print one frame, exit")
    p.add_argument("--width", type=int, default=None, help="console width (default: terminal, or 140)")
    p.add_argument("--no-results", action="store_true", help="do not subscribe to result topics (no latency)")
    p.set_defaults(func=_run_top)

    p = subparsers.add_parser("timeline", help="record frames and draw a pipeline timeline PNG",
                              description="Subscribe to the fleet's results for a window and draw their hops.")
    _common(p)
    p.add_argument("--seconds", type=float, default=10.0, help="recording window (default 10)")
    p.add_argument("-o", "--output", default="timeline.png", help="PNG path (default timeline.png)")
    p.set_defaults(func=_run_timeline)

    p = subparsers.add_parser("exporter", help="Prometheus endpoint fed from the fleet's MQTT telemetry")
    _common(p)
    p.add_argument("--port", type=int, default=9464, help="HTTP port (default 9464)")
    p.add_argument("--bind", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    p.set_defaults(func=_run_exporter)

    p = subparsers.add_parser("ha-discovery", help="keep Home Assistant MQTT discovery configs in step with the fleet",
                              description="Publish HA discovery configs for every node and the pipeline; keeps "
                                          "running: nodes that join appear, removed ones go.")
    _common(p)
    p.add_argument("--once", action="store_true", help="publish for the nodes seen within --seconds, then exit")
    p.add_argument("--seconds", type=float, default=2.0,
                   help="--once/--remove: how long to collect retained births (default 2)")
    p.add_argument("--forget-after", dest="forget_after", type=float, default=600.0,
                   help="delete a dead node's configs after this many seconds (default 600)")
    p.add_argument("--prefix", default="homeassistant", help="HA discovery prefix (default homeassistant)")
    p.add_argument("--remove", action="store_true", help="delete the configs of the nodes seen, then exit")
    p.set_defaults(func=_run_ha)


def timeline_png(results_or_hops: Any, plan: Any, path: str) -> Any:
    """Draw a pipeline timeline and stage-utilisation chart of recorded frames to ``path``.

    ``results_or_hops``: results (``FrameResult``/``wire.Result``: anything with ``.hops``), per-frame
    hop sequences, or bare hops. ``plan``: the ``wire.Plan`` they ran under (or None). Returns the
    :class:`fleetpipe.metrics.HopStats` it drew.
    """
    from fleetpipe.observe._timeline import timeline_png as draw

    return draw(results_or_hops, plan, path)


# ---------------------------------------------------------------------------------------------- private


def _guard(func: Any, args: argparse.Namespace) -> int:
    from fleetpipe.cliargs import broker_from_args
    from fleetpipe.errors import FleetpipeError

    try:
        args.broker = broker_from_args(args)  # URL + credentials + TLS, from --config and the flags
        return int(func(args))
    except FleetpipeError as exc:  # broker unreachable, ...: one line, not a traceback
        print(f"fleetpipe {args.command}: {exc}", file=sys.stderr)
        return 1


def _common(p: argparse.ArgumentParser) -> None:
    from fleetpipe.cliargs import add_broker_args

    add_broker_args(p)


def _run_top(args: argparse.Namespace) -> int:
    from fleetpipe.observe._top import run_top

    return _guard(run_top, args)


def _run_timeline(args: argparse.Namespace) -> int:
    from fleetpipe.observe._timeline import run_timeline

    return _guard(run_timeline, args)


def _run_exporter(args: argparse.Namespace) -> int:
    from fleetpipe.observe._exporter import run_exporter

    return _guard(run_exporter, args)


def _run_ha(args: argparse.Namespace) -> int:
    from fleetpipe.observe._ha import run_ha

    return _guard(run_ha, args)
