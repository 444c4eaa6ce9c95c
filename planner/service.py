"""``fleetpipe planner``: run the planner service for one fleet."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["build_config", "register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``planner`` subcommand."""
    p = subparsers.add_parser("planner", help="run the planner service (plans the fleet, re-plans on changes)")
    p.add_argument("--broker", help="mqtt://host:port")
    p.add_argument("--model", help="an .onnx or .tflite model file (or zoo:NAME)")
    p.add_argument("--fleet", help="fleet name")
    p.add_argument("--bits", type=int, help="activation bit-width between stages (2..8, 16, 32; default 8)")
    p.add_argument("--input-shape", dest="input_shape", action="append", metavar="NAME=D,D,...",
                   help="static shape of a model input with dynamic dims, e.g. x=1,3,224,224 (repeatable; a dynamic "
                        "batch dim alone is taken as 1; TOML: input_shape = [\"x=1,3,224,224\"])")
    p.add_argument("--calibration", help="calibration JSON from `fleetpipe calibrate` (per-cut minimum bits)")
    p.add_argument("--bit-tolerance", dest="bit_tolerance", type=float,
                   help="without --calibration: each cut ships at least the lowest bit-width whose end-to-end output "
                        "error on probe inputs stays within this relative L2 per output (default 0.01)")
    p.add_argument("--no-bit-floors", dest="bit_floors", action="store_false", default=None,
                   help="ship --bits at every cut unchecked (no probe floors; experiments only)")
    p.add_argument("--replan-threshold", dest="replan_threshold", type=float,
                   help="fine-tune the plan when a stage runs this far off its prediction (default 0.2)")
    p.add_argument("--no-adapt", dest="adapt", action="store_false", default=None,
                   help="never fine-tune a running plan (re-plan only when nodes join or leave)")
    p.add_argument("--no-early-exit", dest="early_exit", action="store_false", default=None,
                   help="do not ship the calibration's exit caches (every frame runs through every stage)")
    p.add_argument("--intra", choices=["latency", "pipeline"],
                   help="plan for the lowest one-frame latency: 'latency' with single, replicated and split stages, "
                        "'pipeline' with single-device stages only (default: the throughput planner)")
    p.add_argument("--msg-ms", dest="intra_msg_ms", type=float,
                   help="--intra: fixed cost of one message in ms (default: start at 1 ms and learn it from the "
                        "split stages' leads)")
    p.add_argument("--tiles", dest="intra_tiles", type=int,
                   help="--intra: at most this many row tiles per device of a spatial split, so its messages "
                        "overlap compute (Galaxy+); chosen per unit where it pays (default 4; 1 = never)")
    p.add_argument("--no-measure-parts", dest="intra_measure_parts", action="store_false", default=None,
                   help="--intra: cost split parts from the cost model alone (default: time the part slices)")
    p.add_argument("--profile", help="JSON file of per-layer host times: reused when it matches the model, else "
                                     "measured and written (comparable plans run to run)")
    p.add_argument("--min-nodes", dest="min_nodes", type=int)
    p.add_argument("--expect-nodes", dest="expect_nodes", type=int,
                   help="wait (up to 10 s) for this many nodes before the first plan")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--username", dest="broker_username", help="MQTT username (secure broker)")
    p.add_argument("--password-file", dest="broker_password_file", help="file holding the broker password")
    p.add_argument("--ca-certs", dest="broker_ca_certs", help="CA bundle: enables TLS")
    p.add_argument("--time-limit", dest="time_limit_s", type=float, help="exact solver time limit in s (default 5)")
    p.add_argument("--interface", dest="interfaces", action="append",
                   help="zeroconf: browse/advertise only on this interface or address (repeatable)")
    p.add_argument("--no-announce", dest="announce", action="store_false", default=None)
    p.set_defaults(func=run)
    from fleetpipe.cliargs import config_defaults
    from fleetpipe.config import PlannerConfig

    p.config_defaults = config_defaults(PlannerConfig, {"broker_url": "config file, else zeroconf",
                                                        "intra": "the throughput planner"})


def build_config(args: argparse.Namespace, env: Mapping[str, str]) -> Any:
    """The PlannerConfig from flags > ``FLEETPIPE_*`` env > ``--config`` file > defaults."""
    from fleetpipe.config import PlannerConfig, load

    flags = {k: getattr(args, k, None) for k in ("model", "fleet", "bits", "input_shape", "min_nodes",
                                                  "expect_nodes", "broker_username", "broker_password_file",
                                                  "broker_ca_certs", "calibration", "replan_threshold", "adapt",
                                                  "early_exit", "announce", "intra", "profile", "intra_msg_ms",
                                                  "intra_tiles", "intra_measure_parts", "time_limit_s",
                                                  "bit_tolerance", "bit_floors", "signing_key")}
    flags["input_shape"] = tuple(args.input_shape) if args.input_shape else None
    flags["broker_url"] = args.broker
    flags["interfaces"] = tuple(args.interfaces) if args.interfaces else None
    return load(PlannerConfig, file=args.config, env=env, flags=flags)


def run(args: argparse.Namespace) -> int:
    """Build the PlannerConfig and run the service."""
    from fleetpipe.errors import ConfigError
    from fleetpipe.planner.loop import PlannerService

    try:
        config = build_config(args, dict(os.environ))
    except (ConfigError, TypeError) as exc:
        print(f"fleetpipe planner: {exc}", file=sys.stderr)
        return 2
    if not config.broker.url:
        from fleetpipe.discovery import resolve_broker
        from fleetpipe.errors import FleetpipeError

        try:
            config = resolve_broker(config, interfaces=config.interfaces or None)
        except FleetpipeError as exc:
            print(f"fleetpipe planner: {exc}", file=sys.stderr)
            return 2
    return PlannerService(config).run()
