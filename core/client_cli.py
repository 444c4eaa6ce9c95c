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
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds for the whole call: connect, plan, every result (default 120)")
    p.add_argument("--check", metavar="MODEL",
                   help="also run the whole model (.onnx) locally on each input and compare: relative L2 error and max "
                        "abs per output, top-1 for classifier-shaped outputs; exit 1 when over --tolerance")
    p.add_argument("--tolerance", type=float, default=None, help="--check: relative L2 error allowed per output "
                                                                   "(default 0.01)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Stream the inputs and print one line per result."""
    import time

    import numpy as np

    from fleetpipe.cliargs import broker_from_args
    from fleetpipe.client import FleetClient
    from fleetpipe.errors import FleetpipeError

    deadline = time.monotonic() + args.timeout
    try:
        arrays = [_load_input(path) for path in args.input]
        broker = broker_from_args(args)
        # On a secure broker the ACL grants a client its own result topic, named after its username.
        with FleetClient(broker.url or "", fleet=args.fleet, window=args.window, client_id=broker.username,
                         username=broker.username, password=broker.password(), tls=broker.tls()) as client:
            client.wait_plan(max(deadline - time.monotonic(), 0.1))
            outputs = []
            results: list[Any] = []
            for path, result in zip(args.input, client.stream(arrays, deadline=deadline), strict=True):
                out = result.output
                outputs.append(out)
                results.append(result.outputs)
                top = int(np.argmax(out)) if out.size else -1
                print(f"{path}: frame {result.frame_id} shape {tuple(out.shape)} argmax {top} "
                      f"latency {result.latency_ms:.1f} ms")
    except (FleetpipeError, TimeoutError) as exc:
        print(f"fleetpipe infer: {type(exc).__name__}: {exc}" if str(exc) else f"fleetpipe infer: {exc!r}",
              file=sys.stderr)
        return 1
    if args.output:
        np.save(args.output, np.stack(outputs), allow_pickle=False)
    if args.check:
        return check_outputs(args.check, arrays, results, args.tolerance)
    return 0


def check_outputs(model: str, inputs: list[Any], results: list[Any], tolerance: float | None = None) -> int:
    """Compare the fleet's outputs with the whole model run locally; print one line per output; 0 if within."""
    from fleetpipe.accuracy import DEFAULT_TOLERANCE, compare_outputs

    try:
        reference = _run_locally(model, inputs)
        check = compare_outputs(results, reference, tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"fleetpipe infer: --check {model}: {exc}", file=sys.stderr)
        return 2
    for line in check.lines():
        print(f"check: {line}")
    return 0 if check.ok else 1


def _run_locally(model: str, inputs: list[Any]) -> list[dict[str, Any]]:
    """Every output of ``model`` (an ONNX file) for each input, by name."""
    with open(model, "rb") as fh:
        head = fh.read(8)
    if head[4:8] == b"TFL3":
        raise ValueError("this is a TFLite model; --check runs ONNX models (fleetpipe demo --model FILE.tflite checks "
                         "a TFLite fleet against LiteRT)")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RuntimeError("--check needs onnxruntime (pip install onnxruntime)") from exc
    try:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own errors: not a loadable model
        raise RuntimeError(f"onnxruntime cannot load it: {exc}") from exc
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(None, {name: x}), strict=True)) for x in inputs]
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
