"""``fleetpipe calibrate``: per-cut lowest bit-width within an accuracy floor (COACH), written as JSON.

Cheap to import: onnx, onnxruntime and rich are imported inside the command function.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fleetpipe.errors import FleetpipeError

__all__ = ["cmd_calibrate", "register"]


def register(subparsers: Any) -> None:
    """Add the ``calibrate`` command to the ``fleetpipe`` parser."""
    p = subparsers.add_parser("calibrate", help="calibrate the lowest activation bit-width per cut")
    p.add_argument("--model", required=True, help="an .onnx file or zoo:NAME (zoo:digits uses its real test set)")
    p.add_argument("--input-shape", action="append",
                   help="NAME=D,D,... for an input with dynamic dims (repeatable; a dynamic batch is taken as 1); "
                        "a bare 1,3,224,224 names the first input")
    p.add_argument("--data", type=Path,
                   help=".npz with 'x' (samples stacked on axis 0) and optional 'y' labels; "
                        "default: the digits test set for zoo:digits, else seeded random inputs")
    p.add_argument("--floor", type=float, default=0.005, help="accuracy-loss floor (default 0.005 = 0.5 %%)")
    p.add_argument("--samples", type=int, default=None, help="use only the first N samples")
    p.add_argument("--bits", default="2,3,4,5,6,7,8,16", help="candidate bit-widths (default 2..8 and 16)")
    p.add_argument("--metric", choices=("labels", "agreement", "rel_l2"), help="override the automatic metric")
    p.add_argument("-o", "--out", type=Path, required=True, help="output calibration .json")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Run the calibration with a progress bar and write the JSON."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from fleetpipe.models.calibrate import calibrate

    console = Console(stderr=True)
    try:
        bits = tuple(int(b) for b in args.bits.split(",") if b.strip())
        proto, graph, name, model_id = _model(args.model, args.input_shape)
        shape = graph.inputs[0].shape
        x, y = _data(args, name, shape)
        if args.samples is not None:
            x, y = x[: args.samples], (None if y is None else y[: args.samples])
        n_cuts = len(graph.layers) - 1
        with Progress(TextColumn("calibrating {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=not sys.stderr.isatty()) as bar:
            task = bar.add_task(f"{name} ({len(x)} samples)", total=n_cuts)
            cal = calibrate(proto, graph, x, y, floor=args.floor, bits_candidates=bits, metric=args.metric,
                            progress=lambda done, _total, _cut, _b: bar.update(task, completed=done),
                            model_id=model_id)
    except (FleetpipeError, ValueError, OSError, KeyError) as exc:
        console.print(f"[red]calibrate: {exc}[/red]")
        return 1
    args.out.write_text(cal.to_json() + "\n")
    table = Table(title=f"{name}: metric={cal.metric}, floor={cal.floor:g}, {cal.n_samples} samples")
    for col in ("cut after", "layer", "min bits", "loss at min", "early-exit S_ext"):
        table.add_column(col, justify="right")
    for i, b in enumerate(cal.min_bits):
        loss = cal.loss(i, b)
        exit_doc = cal.exits.get(i)
        table.add_row(str(i), graph.layers[i].name, str(b), "-" if loss is None else f"{loss:+.4f}",
                      "-" if exit_doc is None else f"{exit_doc['threshold']:.4g}")
    Console().print(table)
    console.print(f"wrote {args.out} (model id {cal.model_id}); min_bits per layer: {cal.min_bits_array().tolist()}")
    return 0


def _model(spec: str, input_shape: list[str] | None) -> tuple[Any, Any, str, str]:
    """``(proto, graph, name, model id)`` through the planner's front door, so the ids agree."""
    from fleetpipe.models.shapes import parse_input_shapes
    from fleetpipe.models.source import open_model
    from fleetpipe.slices import content_hash

    items = list(input_shape or [])
    if items and "=" not in items[0]:  # the older bare form names the first model input
        from fleetpipe.models.onnx_graph import read_model

        first = _first_input(read_model(_zoo(spec)) if spec.startswith("zoo:") else read_model(spec))
        items[0] = f"{first}={items[0].replace('x', ',')}"
    loaded = open_model(spec, parse_input_shapes(items) or None)
    if loaded.kind != "onnx":
        raise ValueError("calibrate needs an ONNX model (a TFLite model's floors are probed by the planner)")
    name = spec[4:] if spec.startswith("zoo:") else Path(spec).stem
    return loaded.model, loaded.graph, name, content_hash(loaded.reference.SerializeToString())[:12]


def _zoo(spec: str) -> Any:
    from fleetpipe.models import zoo

    return zoo.build(spec[4:])


def _first_input(proto: Any) -> str:
    inits = {t.name for t in proto.graph.initializer}
    return next(v.name for v in proto.graph.input if v.name not in inits)


def _data(args: argparse.Namespace, name: str, shape: tuple[int, ...]) -> tuple[Any, Any]:
    import numpy as np

    from fleetpipe.models import zoo

    if args.data is not None:
        with np.load(args.data) as d:
            return d["x"].astype(np.float32), (d["y"] if "y" in d.files else None)
    if name == "digits":
        return zoo.digits_test_set()
    n = args.samples or 64
    rng = np.random.default_rng(0)
    return rng.standard_normal((n * shape[0], *shape[1:])).astype(np.float32), None
