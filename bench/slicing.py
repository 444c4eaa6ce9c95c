"""Slicing overhead: a model run as a sequence of slices against the whole model, measured in the same run.

    .venv/bin/python bench/slicing.py [--quick] [--model M] [--width W] [--resolution R] [--stages N]

The model (a zoo ResNet-50 at reduced width by default) is cut into ``--stages`` stages with about
equal FLOPs at its layer boundaries. Both the whole model and the slices run in this process on
onnxruntime's CPU provider with one intra-op thread, interleaved rep by rep so machine load hits
both alike; the slice sequence feeds each slice's outputs to the next in Python (no network, no
codec). Prints medians and the ratio slices/whole: the pure cost of cutting the graph (lost
cross-slice fusion, per-session run overhead, materialised crossing tensors). Most of it comes from
onnxruntime's NCHWc layout (ORT_ENABLE_ALL): each slice reorders its input and output to/from the
blocked layout, which the whole model does only once; with ORT_ENABLE_EXTENDED the ratio is ~1.015.
"""

from __future__ import annotations

import argparse
import statistics
import time

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

    for _ in range(5):
        run_whole()
        run_parts()
    t_whole, t_parts = [], []
    for _ in range(args.reps):
        for fn, sink in ((run_whole, t_whole), (run_parts, t_parts)):
            t0 = time.perf_counter()
            fn()
            sink.append((time.perf_counter() - t0) * 1000)
    whole_ms, parts_ms = statistics.median(t_whole), statistics.median(t_parts)
    crossing = [graph.crossing_bytes(c) for c in cuts]
    print(f"model {args.model} {kw}: {len(graph.layers)} layers, {graph.total_flops / 1e9:.3f} GFLOPs")
    print(f"stages {ranges} (cuts after {cuts}); crossing bytes {crossing}; max abs diff {diff:.3g}")
    print(f"whole model    {whole_ms:8.3f} ms (median of {args.reps}, 1 thread)")
    print(f"{len(parts)} slices seq. {parts_ms:8.3f} ms")
    print(f"slicing overhead ratio (slices / whole): {parts_ms / whole_ms:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
