"""Slicing overhead: a model run as a sequence of slices against the whole model, measured in the same run.

    .venv/bin/python bench/slicing.py [--quick] [--model M] [--width W] [--resolution R] [--stages N] [--no-tflite]

The model (a zoo ResNet-50 at reduced width by default) is cut into ``--stages`` stages with about
equal FLOPs at its layer boundaries. Both the whole model and the slices run in this process on
onnxruntime's CPU provider with one intra-op thread, interleaved rep by rep so machine load hits
both alike; the slice sequence feeds each slice's outputs to the next in Python (no network, no
codec). Prints medians and the ratio slices/whole: the pure cost of cutting the graph (lost
cross-slice fusion, per-session run overhead, materialised crossing tensors). Most of it comes from
onnxruntime's NCHWc layout (ORT_ENABLE_ALL): each slice reorders its input and output to/from the
blocked layout, which the whole model does only once; with ORT_ENABLE_EXTENDED the ratio is ~1.015.

TFLite rows (when ai-edge-litert is installed): the same ONNX model converted with
``fleetpipe.models.onnx_to_tflite``, cut the same way on its own graph, each slice and the whole
model run by the LiteRT runtime a node uses (``TfliteRuntime``, XNNPACK, one thread), interleaved
with the ONNX runs in the same reps; the ratio is TFLite slices / whole TFLite model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from fleetpipe.models import zoo
from fleetpipe.models.graph import split_ranges
from fleetpipe.models.onnx_graph import load_onnx
from fleetpipe.models.profile import random_feeds
from fleetpipe.models.slicing import make_session, run_model, slice_bytes, verify_slices

__all__ = ["balanced_cuts", "main"]


def balanced_cuts(flops: list[int], stages: int) -> list[int]:
    """Cut points (after layer i) splitting ``flops`` into ``stages`` parts of about equal sum."""
    total, acc, cuts = sum(flops), 0, []
    for i, f in enumerate(flops[:-1]):
        acc += f
        if len(cuts) < stages - 1 and acc >= total * (len(cuts) + 1) / stages:
            cuts.append(i)
    return cuts


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the overhead ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer reps")
    parser.add_argument("--no-tflite", action="store_true", help="ONNX rows only")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.resolution, args.reps = 0.25, 64, 20
    kw = {"width": args.width, "resolution": args.resolution}
    model = zoo.build(args.model, **kw)
    graph = load_onnx(model)
    cuts = balanced_cuts([la.flops for la in graph.layers], args.stages)
    ranges = split_ranges(len(graph.layers), cuts)
    feeds = random_feeds(graph)
    diff = verify_slices(model, graph, cuts, feeds)
    whole = make_session(model)
    parts = [make_session(slice_bytes(model, graph, a, b)) for a, b in ranges]

    def run_whole() -> None:
        run_model(whole, feeds)

    def run_parts() -> None:
        env = dict(feeds)
        for session in parts:
            env.update(run_model(session, env))

    runs = [run_whole, run_parts]
    tfl = None if args.no_tflite else _TFLiteBench(model, args.stages, feeds)
    if tfl is not None:
        runs += [tfl.run_whole, tfl.run_parts]
    for _ in range(5):
        for fn in runs:
            fn()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(args.reps):
        for fn, sink in zip(runs, times, strict=True):
            t0 = time.perf_counter()
            fn()
            sink.append((time.perf_counter() - t0) * 1000)
    whole_ms, parts_ms = statistics.median(times[0]), statistics.median(times[1])
    crossing = [graph.crossing_bytes(c) for c in cuts]
    print(f"model {args.model} {kw}: {len(graph.layers)} layers, {graph.total_flops / 1e9:.3f} GFLOPs")
    print(f"stages {ranges} (cuts after {cuts}); crossing bytes {crossing}; max abs diff {diff:.3g}")
    print(f"whole model    {whole_ms:8.3f} ms (median of {args.reps}, 1 thread)")
    print(f"{len(parts)} slices seq. {parts_ms:8.3f} ms")
    print(f"slicing overhead ratio (slices / whole): {parts_ms / whole_ms:.3f}")
    rows = [["onnxruntime", len(graph.layers), cuts, whole_ms, parts_ms, diff]]
    if tfl is not None:
        t_whole, t_parts = statistics.median(times[2]), statistics.median(times[3])
        print(f"tflite: {len(tfl.graph.layers)} layers, stages {tfl.ranges} (cuts after {tfl.cuts}); "
              f"max abs diff slices vs whole {tfl.slice_diff:.3g}, converted vs ONNX {tfl.convert_diff:.3g}")
        print(f"tflite whole   {t_whole:8.3f} ms (LiteRT XNNPACK, 1 thread; {t_whole / whole_ms:.3f} x onnxruntime)")
        print(f"tflite {len(tfl.parts)} slices {t_parts:8.3f} ms")
        print(f"tflite slicing overhead ratio (tflite slices / tflite whole): {t_parts / t_whole:.3f}")
        rows.append(["LiteRT", len(tfl.graph.layers), tfl.cuts, t_whole, t_parts, tfl.slice_diff])
    print()
    print(f"{'runtime':12} {'layers':>6} {'cuts':>14} {'whole ms':>9} {'slices ms':>9} {'ratio':>6} {'max diff':>9}")
    for name, n, c, w, p, d in rows:
        print(f"{name:12} {n:6d} {','.join(map(str, c)):>14} {w:9.3f} {p:9.3f} {p / w:6.3f} {d:9.2g}")
    return 0


class _TFLiteBench:
    """The ONNX model converted to .tflite, cut into balanced stages, loaded in the node's LiteRT runtime."""

    def __init__(self, model: object, stages: int, feeds: dict[str, np.ndarray]) -> None:
        from fleetpipe.models.onnx_to_tflite import onnx_to_tflite, tflite_feeds, verify_conversion
        from fleetpipe.models.tflite import load_tflite, slice_tflite, verify_tflite_slices
        from fleetpipe.node.runtime.tflite import TfliteRuntime

        data = onnx_to_tflite(model)  # type: ignore[arg-type]
        self.graph = load_tflite(data)
        self.cuts = balanced_cuts([la.flops for la in self.graph.layers], stages)
        self.ranges = split_ranges(len(self.graph.layers), self.cuts)
        self.feeds = tflite_feeds(feeds)
        self.convert_diff = verify_conversion(model, data, feeds)  # type: ignore[arg-type]
        self.slice_diff = verify_tflite_slices(data, self.graph, self.cuts, self.feeds)

        def runtime(blob: bytes) -> TfliteRuntime:
            rt = TfliteRuntime(threads=1)
            rt.load(blob)
            return rt

        self.whole = runtime(data)
        self.parts = [runtime(slice_tflite(data, self.graph, a, b)) for a, b in self.ranges]
        self._inputs = [[s.name for s in rt.input_specs()] for rt in self.parts]

    def run_whole(self) -> None:
        self.whole.run(self.feeds)

    def run_parts(self) -> None:
        env = dict(self.feeds)
        for rt, names in zip(self.parts, self._inputs, strict=True):
            env.update(rt.run({n: env[n] for n in names}))


if __name__ == "__main__":
    raise SystemExit(main())
