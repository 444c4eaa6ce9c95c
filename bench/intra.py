"""Intra-layer parallelism on an emulated 4-device fleet, and the learned cost estimator's error.

    .venv/bin/python bench/intra.py [--quick] [--skip-estimator]

Part 1 (latency of one frame). Four emulated devices (rpi5 x2.5, jetson-nano x3, two rpi4 x5 slower
than this host; 940 Mbit/s links; 1 ms per message). Per-layer times are measured on this host (each layer
as its own slice, one thread, median) and scaled by each device's factor; ``fleetpipe.planner.intra.solve_intra`` plans
pipeline-only and with intra-layer splits. Each plan is then *re-costed from measurements*: every
unit that runs on one device is timed as its own slice, every split unit is materialised with
``fleetpipe.models.split`` (verified against the unsplit slice), each part is timed with onnxruntime
(one thread) and scaled by its device's factor, and the critical path is scatter + max part + gather
at the emulated bandwidth, with activations at ``--bits`` (default 8, what the runtime sends). This
is computed from measured part times; ``bench/intra_runtime.py`` measures split stages end to end
over MQTT.

Part 2 (estimator). Zoo models at several widths/resolutions are profiled layer by layer at 1, 2
and 4 onnxruntime threads (cached in bench/out/intra_profiles.json); gradient-boosted trees are
compared with FLOPs scaling (layer FLOPs / GFLOP/s of the configuration fitted on the training
rows) on held-out models and on a held-out thread configuration.

Part 3 (run-time costing). The same profiles as node reports: ``fleetpipe.planner.reported`` costs a device
that reported nothing (learned where it validates, else speed scaling) and the unreported half of a
device's layers (its measured ratio), against plain speed scaling of the host's profile.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from fleetpipe.models import zoo
from fleetpipe.models.onnx_graph import load_onnx
from fleetpipe.models.profile import random_feeds
from fleetpipe.models.slicing import make_session, run_model, slice_model
from fleetpipe.models.split import layer_split_info, split_model, verify_split
from fleetpipe.planner import estimator as E
from fleetpipe.planner.intra import IntraPlan, IntraProblem, solve_intra
from fleetpipe.planner.problem import transfer_ms

__all__ = ["main"]

OUT = Path(__file__).parent / "out"
DEVICES = (("rpi5", 2.5), ("jetson-nano", 3.0), ("rpi4-a", 5.0), ("rpi4-b", 5.0))
BW_MBPS = 940.0
MSG_MS = 1.0


def _time_ms(model: Any, feeds: dict[str, np.ndarray], reps: int) -> float:
    sess = make_session(model, threads=1)
    names = [i.name for i in sess.get_inputs()]
    f = {n: feeds[n] for n in names}
    for _ in range(2):
        sess.run(None, f)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, f)
        ts.append((time.perf_counter() - t0) * 1000)
    return statistics.median(ts)


def _measured_latency(model: Any, graph: Any, plan: IntraPlan, acts: dict[str, np.ndarray],
                      factors: list[float], reps: int, scale: float = 1.0) -> tuple[float, float]:
    """The plan's latency with every split unit's model cost replaced by its re-costed measured cost.

    Unsplit work is already costed from measured per-layer slice times, so only split units differ:
    each is materialised, verified, its parts timed (one thread) x device factor, plus the exchange.
    Returns the latency and the worst split error (max abs diff to the unsplit unit).
    """
    total, worst = plan.latency_ms, 0.0
    for st in plan.stages:
        for u in st.units:
            if not u.kind:
                continue
            piece = slice_model(model, graph, u.first, u.last)
            feeds = {n: acts[n] for n in graph.inputs_of(u.first)}
            sp = split_model(piece, u.kind, [1.0 / factors[d] for d in st.devices])
            worst = max(worst, verify_split(piece, sp, feeds))
            cmax = scatter = gather = 0.0
            for d, part, pf in zip(st.devices, sp.parts, sp.scatter(feeds), strict=True):
                cmax = max(cmax, _time_ms(part.model, pf, reps) * factors[d])
                if d != st.lead:
                    scatter += transfer_ms(part.input_bytes * scale, BW_MBPS) + MSG_MS
                    gather += transfer_ms(part.output_bytes * scale, BW_MBPS) + MSG_MS
            total += scatter + cmax + gather - u.latency_ms
    return total, worst


def _describe(plan: IntraPlan, names: list[str]) -> str:
    out = []
    for st in plan.stages:
        devs = "+".join(names[d] for d in st.devices)
        units = ",".join(f"{u.first}-{u.last}{':' + u.kind if u.kind else ''}" for u in st.units)
        out.append(f"[{st.first}-{st.last} {st.mode} {devs} {units}]")
    return " ".join(out)


def latency_table(quick: bool, reps: int, bits: int = 32) -> None:
    """Part 1: pipeline-only vs intra-layer splits, cost model and re-costed from measured part times."""
    cases = [
        ("resnet50", {"width": 0.5 if quick else 1.0, "resolution": 96 if quick else 160}),
        ("vit", {"resolution": 64, "patch": 8, "dim": 128 if quick else 256, "depth": 2 if quick else 4,
                 "heads": 4 if quick else 8}),
    ]
    names = [d for d, _ in DEVICES]
    factors = [f for _, f in DEVICES]
    scale = bits / 32.0
    print(f"\n== one-frame latency, 4 emulated devices (rpi5 x2.5, jetson x3, 2 x rpi4 x5; 940 Mbit/s; 1 ms/msg;"
          f" activations exchanged at {bits} bits)")
    print("   'measured' = re-costed from onnxruntime times of the actual slices/split parts on this host x device")
    print("   factor + exchange bytes at 940 Mbit/s; NOT end-to-end over MQTT.\n")
    header = f"{'model':9} {'plan':34} {'model ms':>9} {'measured ms':>11} {'vs pipe':>8} {'split err':>9}"
    print(header)
    print("-" * len(header))
    for name, kw in cases:
        model = zoo.build(name, **kw)
        graph = load_onnx(model)
        env = dict(random_feeds(graph))  # every intermediate activation the slices need
        host_l = []
        for i in range(len(graph)):
            piece = slice_model(model, graph, i, i)
            host_l.append(_time_ms(piece, env, reps))
            env.update(run_model(make_session(piece), env))
        host = np.array(host_l)
        info = layer_split_info(model, graph)
        in_b = [graph.tensor_bytes[graph.inputs_of(i)[0]] for i in range(len(graph))]
        p = IntraProblem(
            compute_ms=host[:, None] * np.array(factors)[None, :],
            in_bytes=np.array(in_b, float) * scale, out_bytes=np.array([la.out_bytes for la in graph.layers]) * scale,
            bw_mbps=np.full((4, 4), BW_MBPS), kinds=tuple(i.kinds for i in info),
            halo_rows=[i.halo_rows for i in info], in_rows=[i.in_rows for i in info],
            out_rows=[i.out_rows for i in info], msg_ms=MSG_MS,
        )
        pipe_lat = solve_intra(p, modes=("single",))
        pipe_thr = solve_intra(p, modes=("single",), latency_ms=1e12)
        intra = solve_intra(p)
        intra_thr = solve_intra(p, period_ms=pipe_thr.period_ms * (1 + 1e-9))
        intra_ovl = solve_intra(p, overlap=True, tiles=4)
        rows = [("pipeline-only, min latency", pipe_lat), ("pipeline-only, max throughput", pipe_thr),
                ("intra splits, min latency", intra), ("intra, period<=pipeline max-thr", intra_thr),
                ("intra + overlap (4 tiles, model)", intra_ovl)]
        base_measured = None
        for label, plan in rows:
            if "overlap" in label:
                print(f"{name:9} {label:34} {plan.latency_ms:9.1f} {'-':>11} {'':>8} {'':>9}")
                continue
            meas, err = _measured_latency(model, graph, plan, env, factors, reps, scale)
            if base_measured is None:
                base_measured = meas
            print(f"{name:9} {label:34} {plan.latency_ms:9.1f} {meas:11.1f} {base_measured / meas:7.2f}x "
                  f"{err:9.1e}")
        print(f"  {name} params {kw}: {len(graph)} layers, {graph.total_flops / 1e9:.2f} GFLOP")
        print(f"  min-latency intra plan: {_describe(intra, names)}")
        print(f"  period: pipeline max-thr {pipe_thr.period_ms:.1f} ms, intra@that {intra_thr.period_ms:.1f} ms"
              f" (latency {pipe_thr.latency_ms:.1f} -> {intra_thr.latency_ms:.1f} ms, model)")
        print()


VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("resnet18", {"width": 0.25, "resolution": 64}),
    ("resnet18", {"width": 0.5, "resolution": 96}),
    ("resnet18", {"width": 0.25, "resolution": 128}),
    ("resnet50", {"width": 0.25, "resolution": 64}),
    ("resnet50", {"width": 0.5, "resolution": 64}),
    ("mobilenetv2", {"width": 0.5, "resolution": 96}),
    ("mobilenetv2", {"width": 1.0, "resolution": 64}),
    ("vgg16", {"width": 0.125, "resolution": 64, "fc": 256}),
    ("vit", {"resolution": 32, "patch": 4, "dim": 64, "depth": 2, "heads": 4}),
    ("vit", {"resolution": 32, "patch": 4, "dim": 128, "depth": 2, "heads": 4}),
    ("inception", {"width": 0.25, "resolution": 64}),
]
HELD_OUT_MODELS = {("mobilenetv2", 1.0), ("inception", 0.25), ("vit", 128)}


def estimator_table(refresh: bool) -> None:
    """Part 2: learned estimator vs FLOPs scaling on held-out models and a held-out configuration."""
    cache = OUT / "intra_profiles.json"
    if refresh and cache.exists():
        cache.unlink()
    doc = E.profile_configs(VARIANTS, [1, 2, 4], runs=8, cache=cache)
    rows, cfg = doc["rows"], doc["configs"]
    x = np.array([r["features"] for r in rows])
    dev = np.array([[cfg[str(r["threads"])], r["threads"]] for r in rows])
    ms = np.array([r["ms"] for r in rows])
    flops = np.array([r["flops"] for r in rows], dtype=np.float64)
    th = np.array([r["threads"] for r in rows])
    held = np.array([(r["model"], r["kw"].get("width", r["kw"].get("dim"))) in HELD_OUT_MODELS for r in rows])
    keep = ms > 0.005  # drop layers below 5 us (pure noise)
    print(f"\n== cost estimator: {len(rows)} layer x config profiles in {doc.get('seconds', 0):.0f} s "
          f"(configs GFLOP/s: {', '.join(f'{k} thr {v:.1f}' for k, v in cfg.items())}); layers >= 5 us only")
    header = f"{'held out':28} {'n':>4} {'learned med':>11} {'p90':>7} {'FLOPs med':>10} {'p90':>7}"
    print(header)
    print("-" * len(header))
    for label, test in [("models (mbv2 w1, incep, vit128)", held), ("config: 2 threads", th == 2),
                        ("config: 4 threads", th == 4), ("config: 1 thread", th == 1)]:
        train = ~test
        est = E.fit_estimator(x[train], dev[train], ms[train])
        base = np.zeros(int(test.sum()))
        tt = th[test]
        for t in set(tt.tolist()):
            m = train & (th == t)
            g = flops[m].sum() / ms[m].sum() / 1e6 if m.any() else cfg[str(t)]
            base[tt == t] = E.flops_scaling_ms(flops[test][tt == t], g)
        k = keep[test]
        le = E.relative_errors(est.predict_ms(x[test], dev[test])[k], ms[test][k])
        fe = E.relative_errors(base[k], ms[test][k])
        print(f"{label:28} {le['n']:4d} {le['median']:11.2f} {le['p90']:7.2f} {fe['median']:10.2f} {fe['p90']:7.2f}")
    print("  FLOPs scaling: layer FLOPs / GFLOP/s fitted on the training rows of the same config "
          "(for a held-out config: its calibration GFLOP/s).")


# Part 3's devices: (onnxruntime threads, emulation factor); the host is (1, 1).
REPORT_DEVICES = ((1, 3.0), (2, 1.0), (2, 3.0), (4, 1.0), (4, 3.0))


def reported_table(refresh: bool) -> None:
    """Part 3: the planner's run-time costing from node reports (``fleetpipe.planner.reported``) on the same
    measured profiles: per model, devices are thread configurations x an emulation factor, the host is one
    thread; a device's speed figure is its configuration's calibration GFLOP/s over its factor."""
    from types import SimpleNamespace

    from fleetpipe.planner import reported as R

    doc = E.profile_configs(VARIANTS, [1, 2, 4], runs=8, cache=OUT / "intra_profiles.json")
    cfg = doc["configs"]
    by_model: dict[str, dict[int, dict[int, Any]]] = {}
    for r in doc["rows"]:
        key = f"{r['model']} {r['kw']}"
        by_model.setdefault(key, {}).setdefault(int(r["threads"]), {})[int(r["layer"])] = r
    names = [f"t{t}x{f:g}" for t, f in REPORT_DEVICES]
    births = [SimpleNamespace(speed=cfg[str(t)] / f, emulate_factor=1.0) for t, f in REPORT_DEVICES]
    host_speed = cfg["1"]

    def slowdown(birth: Any) -> float:
        return host_speed / float(birth.speed)

    errs: dict[str, dict[str, list[float]]] = {}
    chosen_learned = {"device": 0, "config": 0, "layers": 0}
    cases = {"device": 0, "config": 0, "layers": 0}
    R_margin = R.LEARN_MARGIN
    R.LEARN_MARGIN = float("inf")  # always fit, so the learned predictions can be scored; choose below
    try:
        for key, per_t in by_model.items():
            n_l = len(per_t[1])
            host = np.array([per_t[1][k]["ms"] for k in range(n_l)])
            layer_x = np.array([per_t[1][k]["features"] for k in range(n_l)])
            truth = {n: np.array([per_t[t][k]["ms"] * f for k in range(n_l)])
                     for n, (t, f) in zip(names, REPORT_DEVICES, strict=True)}
            keep = host > 0.005
            scenarios = [("device", [n]) for n in names] + [
                ("config", [n for n, (t, _) in zip(names, REPORT_DEVICES, strict=True) if t == tt]) for tt in (2, 4)]
            for kind, held in scenarios:
                costs = R.ReportedCosts(key, host, host_speed, layer_x=layer_x)
                for n, (t, _) in zip(names, REPORT_DEVICES, strict=True):
                    if n not in held:
                        costs.add(SimpleNamespace(model_id=key, node_id=n, first_layer=0, last_layer=n_l - 1,
                                                  layer_ms=tuple(truth[n]), threads=t))
                m = costs.matrix(names, births, slowdown)
                v = m.validation
                use = bool(v) and v["learned"] < R_margin * v["scaled"]
                cases[kind] += 1
                chosen_learned[kind] += use
                for n in held:
                    d = names.index(n)
                    tr = truth[n][keep]
                    learned = m.compute_ms[keep, d]
                    scaled = host[keep] * slowdown(births[d])
                    e = errs.setdefault(kind, {"learned": [], "scaled": [], "planner": []})
                    e["learned"].extend(np.abs(learned - tr) / tr)
                    e["scaled"].extend(np.abs(scaled - tr) / tr)
                    e["planner"].extend(np.abs((learned if use else scaled) - tr) / tr)
            # A device that reported the first half of the layers (the others all of them): the planner uses
            # its measured ratio for the other half, or the trees (fitted on every report including that half)
            # where they beat the ratio on held-out halves of the reporting nodes' layers.
            for n in names:
                half = n_l // 2
                d = names.index(n)
                costs = R.ReportedCosts(key, host, host_speed, layer_x=layer_x)
                for o, (to, _) in zip(names, REPORT_DEVICES, strict=True):
                    last = half - 1 if o == n else n_l - 1
                    costs.add(SimpleNamespace(model_id=key, node_id=o, first_layer=0, last_layer=last,
                                              layer_ms=tuple(truth[o][:last + 1]), threads=to))
                m = costs.matrix(names, births, slowdown)  # learned forced (margin inf): the trees' costs
                v = m.validation
                use = "layers_learned" in v and v["layers_learned"] < R_margin * v["layers_ratio"]
                cases["layers"] += 1
                chosen_learned["layers"] += use
                rest = np.arange(half, n_l)[keep[half:]]
                tr = truth[n][rest]
                ratio_ms = host[rest] * np.median(truth[n][:half][keep[:half]] / host[:half][keep[:half]])
                e = errs.setdefault("layers", {"learned": [], "ratio": [], "scaled": [], "planner": []})
                e["learned"].extend(np.abs(m.compute_ms[rest, d] - tr) / tr)
                e["ratio"].extend(np.abs(ratio_ms - tr) / tr)
                e["planner"].extend(np.abs((m.compute_ms[rest, d] if use else ratio_ms) - tr) / tr)
                e["scaled"].extend(np.abs(host[rest] * slowdown(births[d]) - tr) / tr)
    finally:
        R.LEARN_MARGIN = R_margin
    print(f"\n== run-time costing from node reports: {len(by_model)} models, devices "
          f"{', '.join(names)} (threads x factor; host t1x1); layers >= 5 us")
    header = f"{'not reported':34} {'n':>5} {'speed-scaled med':>16} {'p90':>6} {'learned med':>11} {'p90':>6} " \
             f"{'planner med':>11} {'p90':>6}"
    print(header)
    print("-" * len(header))
    labels = {"device": "one device (others report)", "config": "a whole thread config",
              "layers": "half the layers of a device"}
    for kind in ("device", "config", "layers"):
        e = {k: np.array(v) for k, v in errs[kind].items()}

        def cell(a: np.ndarray) -> str:
            return f"{np.median(a):11.2f} {np.percentile(a, 90):6.2f}" if a.size else f"{'-':>11} {'-':>6}"
        print(f"{labels[kind]:34} {e['scaled'].size:5d} {np.median(e['scaled']):16.2f} "
              f"{np.percentile(e['scaled'], 90):6.2f} {cell(e['learned'])} {cell(e['planner'])}")
    lay = {k: np.array(v) for k, v in errs["layers"].items()}
    print(f"  half-reported devices, their measured ratio for the other half: median {np.median(lay['ratio']):.2f}, "
          f"p90 {np.percentile(lay['ratio'], 90):.2f}")
    print(f"  planner: what ReportedCosts chose: for unreported devices the learned model where it beat scaling on "
          f"held-out reporting devices ({chosen_learned['device']}/{cases['device']} single-device, "
          f"{chosen_learned['config']}/{cases['config']} whole-config cases), else scaling; for the other half of "
          f"a half-reported device the learned model where it beat the node's ratio on held-out halves "
          f"({chosen_learned['layers']}/{cases['layers']} cases), else the ratio.")


def main(argv: list[str] | None = None) -> int:
    """Run both parts and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller models, fewer reps")
    parser.add_argument("--reps", type=int, default=0)
    parser.add_argument("--bits", type=int, default=8,
                        help="bit-width of exchanged activations (8: what the runtime sends; 32: float bytes)")
    parser.add_argument("--skip-estimator", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--refresh", action="store_true", help="re-profile the estimator data set")
    args = parser.parse_args(argv)
    reps = args.reps or (5 if args.quick else 15)
    if not args.skip_latency:
        latency_table(args.quick, reps, args.bits)
    if not args.skip_estimator:
        estimator_table(args.refresh)
        reported_table(args.refresh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
