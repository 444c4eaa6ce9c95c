"""``fleetpipe infer``: send arrays from .npy files through a running fleet."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``infer`` subcommand."""
    p = subparsers.add_parser("infer", help="run .npy inputs through a running fleet")
    from fleetpipe.cliargs import add_broker_args

    add_broker_args(p)
    p.add_argument("--input", required=True, nargs="+", help=".npy file(s), one frame each (or a batch with --batch)")
    p.add_argument("--output", help="write the outputs to this .npy (stacked)")
    p.add_argument("--window", type=int, default=8, help="frames in flight (default 8)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a plan and results (default 120)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Stream the inputs and print one line per result."""
    import numpy as np

    from fleetpipe.cliargs import broker_from_args
    from fleetpipe.client import FleetClient
    from fleetpipe.errors import FleetpipeError

    try:
        arrays = [_load_input(path) for path in args.input]
        broker = broker_from_args(args)
        # On a secure broker the ACL grants a client its own result topic, named after its username.
        with FleetClient(broker.url or "", fleet=args.fleet, window=args.window, client_id=broker.username,
                         username=broker.username, password=broker.password(), tls=broker.tls()) as client:
            client.wait_plan(args.timeout)
            outputs = []
            for path, result in zip(args.input, client.stream(arrays), strict=True):
                out = result.output
                outputs.append(out)
                top = int(np.argmax(out)) if out.size else -1
                print(f"{path}: frame {result.frame_id} shape {tuple(out.shape)} argmax {top} "
                      f"latency {result.latency_ms:.1f} ms")
    except (FleetpipeError, TimeoutError) as exc:
        print(f"fleetpipe infer: {exc}", file=sys.stderr)
        return 1
    if args.output:
        np.save(args.output, np.stack(outputs), allow_pickle=False)
    return 0


def _load_input(path: str) -> Any:
    """One input array from a .npy file; ConfigError (one line) when it is missing or not a plain .npy."""
    import numpy as np

    from fleetpipe.errors import ConfigError

    try:
        with open(path, "rb") as fh:
            if fh.read(6) != b"\x93NUMPY":
                raise ConfigError(f"input {path} is not a .npy file (save one with numpy.save)")
        return np.load(path, allow_pickle=False)
    except OSError as exc:
        raise ConfigError(f"cannot read input {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # an object array (pickles are never loaded) or a truncated file
        raise ConfigError(f"input {path}: {exc}") from exc
