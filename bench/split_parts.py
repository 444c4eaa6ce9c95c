"""Do split parts cost their share? Part slices timed alone vs the unit, against the planner's cost model.

    .venv/bin/python bench/split_parts.py [--model resnet50] [--units 0-4,5-7,8-9,10-11,14-14,15-15]

For each spatial unit (layers first-last of the zoo model) the unit slice and its two part slices
(``fleetpipe.models.split``, shares for devices of relative speed 1/10 and 1/12, as in
``bench/intra_runtime.py --slow 4``) run alone on one onnxruntime thread, timed by thread CPU time
(median of 15). Printed per part: measured ``part / (share x unit)`` and what the intra cost model
(``fleetpipe.planner.intra.unit_cost_ms``) assumes, ``(rows / out_rows + halo / 2) / share`` (whole
output rows per part, as ``row_ranges`` gives them). No MQTT, no other
process computing: what is left is the split slices' own overhead (halo rows computed twice, whole rows
at small feature maps, smaller kernels).
"""

from __future__ import annotations

import argparse

import numpy as np

from fleetpipe.models import zoo
from fleetpipe.models.onnx_graph import load_onnx
from fleetpipe.models.slicing import make_session, slice_model
from fleetpipe.models.split import row_ranges, split_model
from fleetpipe.planner.split_deploy import split_info
from fleetpipe.planner.split_profile import cpu_ms

RUNS = 15


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--resolution", type=int, default=160)
    parser.add_argument("--units", default="0-4,5-7,8-9,10-11,14-14,15-15")
    args = parser.parse_args()
    proto = zoo.build(args.model, resolution=args.resolution)
    graph = load_onnx(proto)
    info = split_info(proto, graph)
    rng = np.random.default_rng(0)
    print(f"{args.model} {args.resolution}px: spatial units split in 2 (speeds 1/10, 1/12)")
    print(f"{'unit':>7} {'unit ms':>8} {'halo':>6}  {'part':>4} {'share':>6} {'measured x':>10} {'model x':>8}")
    for spec in args.units.split(","):
        first, last = (int(x) for x in spec.split("-"))
        unit = slice_model(proto, graph, first, last)
        sess = make_session(unit)
        feeds = {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
                 for i in sess.get_inputs()}  # type: ignore[attr-defined]
        whole = cpu_ms(sess, feeds, RUNS)
        split = split_model(unit, "spatial", [1 / 10, 1 / 12])
        rows = 0.0
        for layer in range(last, first - 1, -1):
            li = info[layer]
            rows = rows * (li.in_rows / li.out_rows if li.out_rows else 1.0) + li.halo_rows
        halo = rows / info[first].in_rows if info[first].in_rows else 0.0
        out_rows = int(info[last].out_rows)
        rows_of = row_ranges(out_rows, [p.share for p in split.parts])
        for k, (part, pf) in enumerate(zip(split.parts, split.scatter(feeds), strict=True)):
            ms = cpu_ms(make_session(part.model), pf, RUNS)
            whole_rows = (rows_of[k][1] - rows_of[k][0]) / out_rows
            model_x = min(1.0, whole_rows + halo / 2) / part.share
            print(f"{spec:>7} {whole:8.2f} {halo:6.3f}  {k:>4} {part.share:6.3f} {ms / (part.share * whole):10.2f} "
                  f"{model_x:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
