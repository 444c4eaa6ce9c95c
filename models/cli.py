"""``fleetpipe model``: inspect a model's layers and cuts, slice it into stage files, build zoo models.

``.onnx`` and ``.tflite`` files are both accepted: a .tflite file is analysed by
``fleetpipe.models.tflite`` (file order, the same grouping rules) and sliced into standalone
.tflite stages; ``model zoo NAME -o FILE.tflite`` converts a zoo model with
``fleetpipe.models.onnx_to_tflite``. Cheap to import: onnx, onnxruntime, LiteRT and rich are
imported inside the command functions.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path
from typing import Any

from fleetpipe.errors import FleetpipeError, SliceError

__all__ = ["register"]

DEFAULT_RTOL = 1e-5  # = fleetpipe.models.source.DEFAULT_RTOL (not imported: this module stays cheap)


class VerifyFailedError(SliceError):
    """``--verify``: the slices do not reproduce the whole model within ``--rtol``."""


def register(subparsers: Any) -> None:
    """Add the ``model`` command group to the ``fleetpipe`` parser."""
    parser = subparsers.add_parser("model", help="inspect, slice and build models")
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    inspect = sub.add_parser("inspect", help="table of layers, FLOPs, params, crossing bytes and cuts")
    _model_args(inspect)
    inspect.set_defaults(func=cmd_inspect)

    sl = sub.add_parser(
        "slice", help="write one content-addressed .onnx or .tflite file per stage plus manifest.json"
    )
    _model_args(sl)
    sl.add_argument("--cuts", required=True, help="cut after these layer indices, e.g. 3,7")
    sl.add_argument("-o", "--out", type=Path, required=True, help="output directory")
    sl.add_argument("--verify", action="store_true",
                    help="run the slices in sequence and compare with the whole model; exit 1 (and write nothing) "
                         "when they differ by more than --rtol")
    sl.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                    help=f"--verify: largest relative difference allowed, max |a-b| / max |a| "
                         f"(default {DEFAULT_RTOL:g})")
    sl.set_defaults(func=cmd_slice)

    zoo = sub.add_parser("zoo", help="build a zoo model and save it as .onnx (or .tflite, by the suffix)")
    zoo.add_argument(
        "name", help="zoo model name: inception, mobilenetv2, resnet18, resnet50, vgg16, vit, digits"
    )
    zoo.add_argument("-o", "--out", type=Path, required=True, help="output .onnx or .tflite file")
    _zoo_options(zoo)
    zoo.set_defaults(func=cmd_zoo)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the layer table and candidate cuts."""
    from rich.console import Console
    from rich.table import Table

    try:
        graph = _load(args).graph
    except FleetpipeError as exc:
        return _fail(exc)
    console = Console()
    table = Table(
        title=f"{graph.name}: {len(graph.layers)} layers, {graph.total_flops / 1e9:.3f} GFLOPs, "
        f"{graph.total_param_bytes / 1e6:.2f} MB params, order={graph.order}"
    )
    for col in ("#", "layer", "ops", "FLOPs", "params", "out bytes", "crossing"):
        table.add_column(col, justify="right" if col not in ("layer", "ops") else "left")
    for layer in graph.layers:
        table.add_row(
            str(layer.index),
            layer.name,
            _ops(layer.op_types) + (" [unknown]" if layer.unknown_ops else ""),
            _si(layer.flops),
            _si(layer.param_bytes, "B"),
            _si(layer.out_bytes, "B"),
            str(len(layer.out_tensors)),
        )
    console.print(table)
    cuts = ", ".join(f"{i}:{_si(b, 'B')}" for i, b in graph.candidate_cuts())
    console.print(
        f"input {_si(graph.input_bytes, 'B')}; candidate cuts (after layer: bytes): {cuts or 'none'}"
    )
    return 0


def cmd_slice(args: argparse.Namespace) -> int:
    """Write the slices and a manifest: all of them, or (on any error or a failed --verify) none."""
    from fleetpipe.models.graph import split_ranges
    from fleetpipe.models.profile import random_feeds
    from fleetpipe.models.slicing import content_hash

    try:
        loaded = _load(args)
        graph = loaded.graph
        cuts = [int(c) for c in args.cuts.split(",") if c.strip()]
        ranges = split_ranges(len(graph.layers), cuts)
        files: dict[str, bytes] = {}
        stages = []
        for i, (first, last) in enumerate(ranges):
            data = loaded.slice(first, last)
            digest = content_hash(data)
            files[f"{digest}.{loaded.kind}"] = data
            layers = graph.layers[first : last + 1]
            stages.append(
                {
                    "stage": i,
                    "first_layer": first,
                    "last_layer": last,
                    "file": f"{digest}.{loaded.kind}",
                    "hash": digest,
                    "bytes": len(data),
                    "flops": sum(la.flops for la in layers),
                    "param_bytes": sum(la.param_bytes for la in layers),
                    "inputs": [_tensor(graph, t) for t in graph.inputs_of(first)],
                    "outputs": [_tensor(graph, t) for t in graph.crossing(last)],
                }
            )
        manifest: dict[str, Any] = {
            "model": graph.name,
            "format": loaded.kind,
            "layers": len(graph.layers),
            "cuts": cuts,
            "order": graph.order,
            "input_shapes": {name: list(shape) for name, shape in loaded.input_shapes.items()},
            "stages": stages,
        }
        if args.verify:
            rel = loaded.verify(cuts, random_feeds(graph))
            manifest["max_rel_diff"] = rel
            manifest["rtol"] = args.rtol
            if not rel <= args.rtol:
                raise VerifyFailedError(
                    f"verify failed: the slices differ from the whole model by {rel:.3g} (relative: max "
                    f"|a-b| / max |a| over the outputs), above --rtol {args.rtol:g}; no files written"
                )
        _write_all(args.out, files, manifest)
    except (FleetpipeError, ValueError, OSError) as exc:
        return _fail(exc)
    for s in stages:
        print(f"stage {s['stage']}: layers {s['first_layer']}..{s['last_layer']} -> {args.out / s['file']}")
    if "max_rel_diff" in manifest:
        print(f"verified: max relative difference vs the whole model {manifest['max_rel_diff']:.3g} "
              f"(<= --rtol {args.rtol:g})")
    return 0


def _write_all(out: Path, files: dict[str, bytes], manifest: dict[str, Any]) -> None:
    """Stage files and manifest written to a temporary directory inside ``out``, then moved in (manifest last):
    a failure leaves no stage file without its manifest."""
    import os
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fleetpipe-slice-", dir=out) as tmp:
        staging = Path(tmp)
        for fname, data in files.items():
            (staging / fname).write_bytes(data)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for fname in [*files, "manifest.json"]:
            os.replace(staging / fname, out / fname)


def cmd_zoo(args: argparse.Namespace) -> int:
    """Build a zoo model and save it (converted to TFLite for a .tflite path)."""
    import onnx

    from fleetpipe.models import zoo

    try:
        model = zoo.build(args.name, **_zoo_kwargs(args))
        if args.out.suffix == ".tflite":
            from fleetpipe.models.onnx_to_tflite import onnx_to_tflite

            shapes = {"input": zoo.input_shape(args.name)} if args.name == "digits" else None
            data = onnx_to_tflite(model, shapes)
    except (KeyError, TypeError, ValueError, FleetpipeError) as exc:
        return _fail(exc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".tflite":
        args.out.write_bytes(data)
    else:
        onnx.save(model, str(args.out))
    print(f"{args.name} -> {args.out} ({args.out.stat().st_size} bytes)")
    return 0


# --- helpers ---------------------------------------------------------------------------------------


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="an .onnx or .tflite file, or zoo:NAME")
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D,D,...",
        help="static shape of a model input with dynamic dims, e.g. x=1,3,224,224 (repeatable; a dynamic "
        "batch dim alone is taken as 1)",
    )
    p.add_argument(
        "--order", default="greedy", choices=("greedy", "dfs", "file"), help="node linearisation (ONNX only)"
    )
    p.add_argument("--grouping", default="blocks", choices=("blocks", "nodes"), help="layer grouping")
    _zoo_options(p)


def _zoo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=float, help="zoo: channel width multiplier")
    p.add_argument("--resolution", type=int, help="zoo: input resolution")
    p.add_argument("--depth", type=int, help="zoo (vit): number of encoder blocks")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="zoo: other builder option"
    )


def _zoo_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for key in ("width", "resolution", "depth"):
        if getattr(args, key, None) is not None:
            kw[key] = getattr(args, key)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            kw[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kw[key] = value
    return kw


def _load(args: argparse.Namespace) -> Any:
    """The model of ``args.file`` as a ``fleetpipe.models.source.LoadedModel`` (pinned, folded, checked)."""
    from fleetpipe.models.shapes import parse_input_shapes
    from fleetpipe.models.source import open_model

    shapes = parse_input_shapes(args.input_shape)
    zoo_kwargs: dict[str, Any] = {}
    if args.file.startswith("zoo:"):
        try:
            zoo_kwargs = _zoo_kwargs(args)
        except ValueError as exc:
            raise FleetpipeError(str(exc)) from exc
    return open_model(args.file, shapes or None, order=args.order, grouping=args.grouping, zoo_kwargs=zoo_kwargs)


def _tensor(graph: Any, name: str) -> dict[str, Any]:
    info = graph.tensors[name]
    return {"name": name, "dtype": info.dtype, "shape": list(info.shape), "bytes": info.nbytes}


def _ops(op_types: tuple[str, ...]) -> str:
    counts: dict[str, int] = {}
    for op in op_types:
        counts[op] = counts.get(op, 0) + 1
    return " ".join(op if n == 1 else f"{op}x{n}" for op, n in counts.items())


def _si(value: float, unit: str = "") -> str:
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{prefix}{unit}"
    return f"{value:g}{unit}"


def _fail(exc: BaseException) -> int:
    import sys

    print(f"fleetpipe model: error: {exc}", file=sys.stderr)
    return 1
