"""``fleetpipe plan``: plan a problem file and print the plan (JSON or a table).

    fleetpipe plan --problem FILE.json [--json] [--time-limit S] [--method exact|heuristic|...]
    fleetpipe plan --model M.onnx --fleet FLEET.toml --intra latency [--msg-ms 1] [--tiles 4] [--json]

``--intra`` plans one frame's latency with single, replicated and split stages (FlexPie/Galaxy+,
``fleetpipe.planner.intra``; ``pipeline``: single-device stages only), and prints the stages with their
units (layers, split kind, row tiles) next to the pipeline-only latency of the same cost model.

Layers are numbered as everywhere else in fleetpipe (``model inspect``, ``model slice``, the demo): 0-based,
inclusive, and so are stages. Only ``--problem`` files keep the neutral format's own 1-based layer numbers
(planner-problems/README.md), in and out; the JSON says which in ``layer_base``.
Exit codes: 0 plan printed, 1 no feasible plan (InfeasiblePlan), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from fleetpipe.errors import InfeasiblePlan, PlanningError

__all__ = ["METHODS", "intra_to_json", "plan_problem", "plan_to_json", "register"]

METHODS = ("exact", "heuristic", "even", "neurosurgeon", "memory")

EXIT_OK = 0
EXIT_INFEASIBLE = 1
EXIT_BAD_INPUT = 2


def register(subparsers: Any) -> None:
    """Add the ``plan`` subcommand."""
    parser = subparsers.add_parser("plan", help="partition a model over a fleet",
                                   description=__doc__.splitlines()[0] if __doc__ else None)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--problem", help="problem file in the neutral JSON format")
    source.add_argument("--model", help="an .onnx or .tflite model (or zoo:NAME) to plan for the --fleet file")
    parser.add_argument("--fleet", help="fleet description (TOML, see fleetpipe.planner.fleetfile)")
    parser.add_argument("--bits", type=int, default=32, help="activation bit-width between stages (--model)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=D,D,...",
                        help="static shape of a model input with dynamic dims, e.g. x=1,3,224,224 (repeatable; a "
                             "dynamic batch dim alone is taken as 1)")
    parser.add_argument("--bit-tolerance", type=float, default=0.01,
                        help="--model without --calibration: each cut ships at least the lowest bit-width whose "
                             "end-to-end output error on probe inputs stays within this relative L2 per output")
    parser.add_argument("--no-bit-floors", dest="bit_floors", action="store_false",
                        help="--model: ship --bits at every cut unchecked")
    parser.add_argument("--calibration", help="--model: calibration JSON (`fleetpipe calibrate`): its per-cut floors")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--time-limit", type=float, default=8.0, help="exact solver time limit (s)")
    parser.add_argument("--method", choices=METHODS, default="exact", help="planner to use")
    parser.add_argument("--intra", choices=["latency", "pipeline"],
                        help="--model: minimise one frame's latency with split/replicated stages ('latency') or "
                             "single-device stages only ('pipeline')")
    parser.add_argument("--msg-ms", type=float, default=1.0, help="--intra: fixed cost of one message (ms)")
    parser.add_argument("--tiles", type=int, default=4, help="--intra: at most this many row tiles per device of a "
                                                             "spatial split (1 = no tiling)")
    parser.add_argument("--no-measure-parts", dest="measure_parts", action="store_false",
                        help="--intra: cost split parts from the cost model alone (default: time the part slices)")
    parser.set_defaults(func=_run)


def plan_problem(problem: Any, method: str = "exact", *, time_limit_s: float = 8.0) -> Any:
    """Plan ``problem`` (a :class:`~fleetpipe.planner.problem.Problem`) with ``method``; a PlanResult."""
    from fleetpipe.planner import baselines, heuristic, partition

    if method == "exact":
        return partition.solve(problem, time_limit_s=time_limit_s)
    if method == "heuristic":
        return heuristic.refine(problem, None, time_limit_s=min(time_limit_s, 1.0))
    if method == "even":
        return baselines.even_split(problem)
    if method == "neurosurgeon":
        return baselines.neurosurgeon(problem)
    if method == "memory":
        return baselines.memory_split(problem)
    raise PlanningError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def plan_to_json(problem: Any, result: Any, base: int = 1) -> dict[str, Any]:
    """The JSON document for a plan (inclusive layers numbered from ``base``: 0 for models, 1 for problem files)."""
    rep = result.report
    stages = []
    for sr in rep.stages:
        st = sr.stage
        stages.append({
            "device": problem.device_names[st.devices[0]],
            "devices": [problem.device_names[d] for d in st.devices],
            "first_layer": st.first + base, "last_layer": st.last + base, "bits": st.bits,
            "compute_ms": round(sr.compute_ms, 4), "transfer_ms": round(sr.transfer_ms, 4),
            "mem_need_bytes": round(sr.mem_need_bytes), "utilisation": round(sr.utilisation, 4),
            "bubble_ms": round(sr.bubble_ms, 4),
        })
    gap = result.gap
    return {
        "problem": problem.name, "method": result.method, "layer_base": base, "stages": stages,
        "bottleneck_ms": round(rep.bottleneck_ms, 4), "latency_ms": round(rep.latency_ms, 4),
        "throughput_per_s": round(rep.throughput_per_s, 4), "solve_s": round(result.solve_s, 4),
        "exact": result.exact, "latency_optimal": result.latency_optimal,
        "lower_bound_ms": None if result.lower_bound_ms is None else round(result.lower_bound_ms, 4),
        "gap": None if gap is None or not math.isfinite(gap) else round(gap, 6),
        "feasible": rep.feasible, "reason": rep.reason,
    }


def _run(args: argparse.Namespace) -> int:
    from fleetpipe.errors import FleetpipeError
    from fleetpipe.planner.problem import load_problem

    if args.intra:
        return _run_intra(args)
    bit_plan = None
    try:
        info = _model_info(args) if args.model else None
        problem = load_problem(args.problem) if args.problem else _model_problem(args, info)
    except (FleetpipeError, ValueError) as exc:
        print(f"fleetpipe plan: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if info is None:
            result = plan_problem(problem, args.method, time_limit_s=args.time_limit)
        else:  # per-cut bit floors (fleetpipe.planner.bitwidth)
            from fleetpipe.planner.bitwidth import plan_model_bits

            problem, result, bit_plan = plan_model_bits(
                problem, info, args.bits, lambda p: plan_problem(p, args.method, time_limit_s=args.time_limit),
                tolerance=args.bit_tolerance, floors=args.bit_floors, calibration=args.calibration)
    except InfeasiblePlan as exc:
        print(f"fleetpipe plan: infeasible: {exc}", file=sys.stderr)
        return EXIT_INFEASIBLE
    except (FleetpipeError, ValueError) as exc:
        print(f"fleetpipe plan: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    doc = plan_to_json(problem, result, base=1 if args.problem else 0)
    if bit_plan is not None:
        doc["bit_widths"] = bit_plan.as_dict()
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        _print_table(doc)
        if bit_plan is not None:
            print(bit_plan.summary())
    return EXIT_OK


def _model_problem(args: argparse.Namespace, info: Any = None) -> Any:
    """Profile the model on this host and build the problem for the described fleet."""
    from fleetpipe.errors import ConfigError
    from fleetpipe.planner.fleetfile import load_fleet, problem_for

    if not args.fleet:
        raise ConfigError("--model needs --fleet FLEET.toml")
    fleet = load_fleet(args.fleet)
    return problem_for(info or _model_info(args), fleet, args.bits)


def _model_info(args: argparse.Namespace) -> Any:
    from fleetpipe.planner.loop import load_model_info

    return load_model_info(args.model, args.input_shape)


def intra_to_json(problem: Any, plan: Any, pipeline: Any, base: int = 0) -> dict[str, Any]:
    """The JSON document of an intra plan (inclusive layers from ``base``) with the pipeline-only latency."""
    names = problem.device_names
    stages = [{
        "mode": st.mode, "devices": [names[d] for d in st.devices], "lead": names[st.lead],
        "first_layer": st.first + base, "last_layer": st.last + base, "latency_ms": round(st.latency_ms, 4),
        "period_ms": round(st.period_ms, 4),
        "units": [{"first_layer": u.first + base, "last_layer": u.last + base, "kind": u.kind or "lead",
                   "tiles": u.tiles, "latency_ms": round(u.latency_ms, 4)} for u in st.units] if st.mode == "split"
        else [],
    } for st in plan.stages]
    return {"problem": problem.name, "method": "intra", "layer_base": base, "stages": stages,
            "latency_ms": round(plan.latency_ms, 4),
            "period_ms": round(plan.period_ms, 4), "pipeline_latency_ms": round(pipeline.latency_ms, 4),
            "split_units": plan.n_split_units}


def _run_intra(args: argparse.Namespace) -> int:
    """``--intra``: the min-latency intra plan of a model on a fleet file."""
    from fleetpipe.errors import ConfigError, FleetpipeError
    from fleetpipe.planner import split_deploy
    from fleetpipe.planner.intra import solve_intra
    from fleetpipe.planner.split_profile import plan_splits

    try:
        if not args.model:
            raise ConfigError("--intra needs --model and --fleet (split kinds come from the model's graph)")
        if args.msg_ms < 0 or not 1 <= args.tiles <= 16:
            raise ConfigError("--msg-ms must be >= 0 and --tiles 1..16")
        info = _model_info(args)
        problem = _model_problem(args, info)
        split_info = split_deploy.split_info(info.proto, info.graph)
        bits = min(args.bits, 32)
        ip = split_deploy.intra_problem(problem, split_info, bits, args.msg_ms)
    except (FleetpipeError, ValueError) as exc:
        print(f"fleetpipe plan: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        pipeline = solve_intra(ip, modes=("single",))
        plan = pipeline if args.intra == "pipeline" else plan_splits(
            problem, split_info, info.proto, info.graph, bits=bits, msg_ms=args.msg_ms, tiles=args.tiles,
            factors={} if args.measure_parts else None)[0]
    except InfeasiblePlan as exc:
        print(f"fleetpipe plan: infeasible: {exc}", file=sys.stderr)
        return EXIT_INFEASIBLE
    doc = intra_to_json(problem, plan, pipeline)
    if args.json:
        print(json.dumps(doc, indent=1))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{doc['problem'] or 'plan'} (intra {args.intra}, {args.msg_ms:g} ms per message)")
    for col in ("#", "mode", "device(s)", "layers", "latency ms", "units (layers kind[xtiles] ms)"):
        table.add_column(col, justify="left" if col in ("mode", "device(s)", "units (layers kind[xtiles] ms)")
                         else "right")
    for i, st in enumerate(doc["stages"]):
        units = ", ".join(f"{u['first_layer']}-{u['last_layer']} {u['kind']}"
                          f"{'x' + str(u['tiles']) if u['tiles'] > 1 else ''} {u['latency_ms']:.1f}"
                          for u in st["units"])
        table.add_row(str(i), st["mode"], ", ".join(st["devices"]), f"{st['first_layer']}-{st['last_layer']}",
                      f"{st['latency_ms']:.2f}", units)
    console = Console()
    console.print(table)
    gain = doc["pipeline_latency_ms"] / max(doc["latency_ms"], 1e-9)
    console.print(f"latency {doc['latency_ms']:.2f} ms (pipeline-only {doc['pipeline_latency_ms']:.2f} ms, "
                  f"{gain:.2f}x), period {doc['period_ms']:.2f} ms, {doc['split_units']} split units")
    return EXIT_OK


def _print_table(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{doc['problem'] or 'plan'} ({doc['method']})")
    cols = ("#", "device(s)", "layers", "bits", "compute ms", "transfer ms", "mem MB", "util", "bubble ms")
    for col in cols:
        table.add_column(col, justify="right" if col not in ("device(s)",) else "left")
    for i, st in enumerate(doc["stages"]):
        table.add_row(str(i), ", ".join(st["devices"]), f"{st['first_layer']}-{st['last_layer']}",
                      str(st["bits"]), f"{st['compute_ms']:.2f}", f"{st['transfer_ms']:.2f}",
                      f"{st['mem_need_bytes'] / 1e6:.1f}", f"{st['utilisation']:.0%}",
                      f"{st['bubble_ms']:.2f}")
    console = Console()
    console.print(table)
    gap = doc["gap"]
    quality = "optimal" if doc["exact"] else f"gap <= {gap:.2%}" if gap is not None else "no bound"
    console.print(f"bottleneck {doc['bottleneck_ms']:.2f} ms ({doc['throughput_per_s']:.2f}/s), "
                  f"latency {doc['latency_ms']:.2f} ms, {quality}, solved in {doc['solve_s']:.3f} s")
    if not doc["feasible"]:
        console.print(f"[red]infeasible plan:[/red] {doc['reason']}")
