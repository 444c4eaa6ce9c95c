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

from fleetpipe.errors import FleetpipeError

__all__ = ["register"]


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
    sl.add_argument("--verify", action="store_true", help="run the slices and compare with the whole model")
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
        _, graph = _load(args)
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
    """Write the slices and a manifest."""
    from fleetpipe.models.graph import split_ranges
    from fleetpipe.models.profile import random_feeds
    from fleetpipe.models.slicing import content_hash

    try:
        model, graph = _load(args)
        tflite = isinstance(model, bytes)
        cuts = [int(c) for c in args.cuts.split(",") if c.strip()]
        ranges = split_ranges(len(graph.layers), cuts)
        args.out.mkdir(parents=True, exist_ok=True)
        stages = []
        for i, (first, last) in enumerate(ranges):
            data = _slice(model, graph, first, last)
            digest = content_hash(data)
            path = args.out / f"{digest}.{'tflite' if tflite else 'onnx'}"
            path.write_bytes(data)
            layers = graph.layers[first : last + 1]
            stages.append(
                {
                    "stage": i,
                    "first_layer": first,
                    "last_layer": last,
                    "file": path.name,
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
            "format": "tflite" if tflite else "onnx",
            "layers": len(graph.layers),
            "cuts": cuts,
            "order": graph.order,
            "stages": stages,
        }
        if args.verify:
            manifest["max_abs_diff"] = _verify(model, graph, cuts, random_feeds(graph))
    except (FleetpipeError, ValueError) as exc:
        return _fail(exc)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for s in stages:
        print(f"stage {s['stage']}: layers {s['first_layer']}..{s['last_layer']} -> {args.out / s['file']}")
    if "max_abs_diff" in manifest:
        print(f"verified: max abs diff vs whole model {manifest['max_abs_diff']:.3g}")
    return 0


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
        help="static shape for a model input with dynamic dimensions (repeatable)",
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


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from fleetpipe.models import zoo
    from fleetpipe.models.onnx_graph import load_onnx

    shapes: dict[str, tuple[int, ...]] = {}
    for item in args.input_shape:
        name, sep, dims = item.partition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            sep = ""
        if not sep:
            raise FleetpipeError(f"--input-shape expects NAME=D,D,..., got {item!r}")
    if args.file.startswith("zoo:"):
        name = args.file[4:]
        try:
            kw = _zoo_kwargs(args)
            model = zoo.build(name, **kw)
        except (KeyError, TypeError, ValueError) as exc:
            raise FleetpipeError(str(exc)) from exc
        if name == "digits" and not shapes:
            shapes = {"input": zoo.input_shape(name)}
        source: Any = model
    elif str(args.file).endswith(".tflite"):
        if shapes:
            raise FleetpipeError("--input-shape applies to ONNX models; a .tflite file has static shapes")
        try:
            from fleetpipe.models.tflite import load_tflite
        except ImportError as exc:
            raise FleetpipeError(str(exc)) from exc
        path = Path(args.file)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise FleetpipeError(f"cannot read {path}: {exc}") from exc
        return data, load_tflite(data, name=path.stem, grouping=args.grouping)
    else:
        from fleetpipe.models.onnx_graph import read_model

        source = model = read_model(args.file)
        name = Path(args.file).stem
    graph = load_onnx(source, shapes or None, order=args.order, grouping=args.grouping, name=name)
    return model, graph


def _slice(model: Any, graph: Any, first: int, last: int) -> bytes:
    if isinstance(model, bytes):
        from fleetpipe.models.tflite import slice_tflite

        return slice_tflite(model, graph, first, last)
    from fleetpipe.models.slicing import slice_bytes

    return bytes(slice_bytes(model, graph, first, last))


def _verify(model: Any, graph: Any, cuts: list[int], feeds: Any) -> float:
    if isinstance(model, bytes):
        from fleetpipe.models.tflite import verify_tflite_slices

        return verify_tflite_slices(model, graph, cuts, feeds)
    from fleetpipe.models.slicing import verify_slices

    return verify_slices(model, graph, cuts, feeds)


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
