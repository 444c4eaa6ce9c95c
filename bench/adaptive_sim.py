"""Adaptive bit-width + online re-planning vs a fixed plan with fixed 8-bit activations (SIMULATION).

    .venv/bin/python bench/adaptive.py [--seconds 8] [--batch 256]

This first version is a discrete-event simulation, not a run on the MQTT runtime (the lead wires that
later): a 3-stage pipeline of the trained digits MLP (one layer per stage, frames of ``--batch`` digits)
over 4 emulated devices, every stage and link a FIFO server. The links follow a scripted bandwidth
profile 100 -> 50 -> 20 -> 100 Mbit/s and the second device slows down 3x mid-run. Both policies see the
same script in the same run:

- fixed: the plan made at start, every activation at 8 bits;
- adaptive: per-frame bit-width from :class:`fleetpipe.node.adapt.AdaptiveBits` (floor = the real
  calibration of the digits model), and :class:`fleetpipe.planner.adapt.DeviationMonitor` +
  :func:`fleetpipe.planner.adapt.fine_tune` re-planning (a 50 ms stall to load the new slices).

Bytes per frame come from the model's real crossing tensors; the accuracy loss is measured on the digits
test set's real labels with the activations quantized at the bit-widths each policy used.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import numpy as np

from fleetpipe import codec
from fleetpipe.models import onnx_graph, slicing, zoo
from fleetpipe.models.calibrate import calibrate
from fleetpipe.node.adapt import AdaptiveBits, BandwidthEstimator
from fleetpipe.planner.adapt import DeviationMonitor, device_factors, fine_tune, rescale_problem
from fleetpipe.planner.cost import Stage, evaluate
from fleetpipe.planner.problem import Problem

__all__ = ["main"]

PROFILE = ((0.0, 100.0), (0.25, 50.0), (0.5, 20.0), (0.75, 100.0))  # (fraction of the run, Mbit/s)
SLOW_AT, SLOW_FACTOR, SLOW_DEVICE = 0.4, 3.0, 1
LAYER_MS = (6.0, 5.0, 1.0)  # per frame on an unslowed device
STALL_S = 0.05


def _bw(t: float, total: float) -> float:
    return [bw for at, bw in PROFILE if t >= at * total][-1]


def _slow(dev: int, t: float, total: float) -> float:
    return SLOW_FACTOR if dev == SLOW_DEVICE and t >= SLOW_AT * total else 1.0


def simulate(adaptive: bool, *, seconds: float, cut_bytes: tuple[int, ...], min_bits: tuple[int, ...],
             problem: Problem) -> dict[str, object]:
    """Run one policy; returns frames done, mean bytes/frame, bit-width use and re-plans."""
    plan = tuple(Stage((d,), d, d) for d in range(3))
    free: dict[object, float] = {}
    monitor = DeviationMonitor.for_plan(problem, plan, threshold=0.2, window_s=0.3) if adaptive else None
    links = {k: AdaptiveBits(min_bits=min_bits[k], nbytes_at_32=cut_bytes[k],
                             estimator=BandwidthEstimator(alpha=0.3, window=4)) for k in range(2)}
    t_in, done, sent, bits_used, replans = 0.0, 0, 0, Counter(), []
    stall_until = 0.0
    while True:
        t = max(t_in, stall_until)
        if t >= seconds:
            break
        t_in = t
        frame_bits = []
        for k, st in enumerate(plan):
            dev = st.devices[0]
            comp = sum(LAYER_MS[i] for i in range(st.first, st.last + 1)) * _slow(dev, t, seconds) / 1000
            start = max(t, free.get(dev, 0.0))
            t = free[dev] = start + comp
            if k == 0:
                t_in = start + comp  # the source is saturating: next frame enters when stage 0 frees
            if monitor is not None:
                monitor.observe(k, comp * 1000, now=t)
            if k + 1 == len(plan):
                break
            cut = st.last
            prev_ms = comp * 1000
            nxt = plan[k + 1]
            next_ms = sum(LAYER_MS[i] for i in range(nxt.first, nxt.last + 1)) * _slow(nxt.devices[0], t, seconds)
            bits = links[cut].decide(prev_ms, next_ms).bits if adaptive else 8
            nbytes = codec.encoded_nbytes("float32", (cut_bytes[cut] // 4,), bits)
            link = ("link", dev, nxt.devices[0])
            start = max(t, free.get(link, 0.0))
            dur = nbytes * 8 / (_bw(start, seconds) * 1e6)
            t = free[link] = start + dur
            if adaptive:
                links[cut].observe_transfer(nbytes, dur)
            sent += nbytes
            frame_bits.append((cut, bits))
        if t <= seconds:
            done += 1
            bits_used[tuple(frame_bits)] += 1
        if monitor is not None and (devs := monitor.deviating(now=t_in)):
            result = fine_tune(problem, plan, devs)
            if result is not None:
                for d, f in device_factors(plan, devs).items():  # the planner's view follows the measurement
                    problem = rescale_problem(problem, d, f)
                plan = result.stages
                replans.append((round(t_in, 2), [("ABCD"[s.devices[0]], s.first, s.last) for s in plan]))
                stall_until = t_in + STALL_S
                monitor.reset([max(s.compute_ms, 1e-9) for s in evaluate(problem, plan).stages])
    return {"frames": done, "bytes_per_frame": sent / max(done, 1), "bits": bits_used, "replans": replans}


def main(argv: list[str] | None = None) -> int:
    """Calibrate the digits model, simulate both policies, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=8.0, help="simulated seconds (default 8)")
    ap.add_argument("--batch", type=int, default=256, help="digits per frame (default 256)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model = zoo.build("digits")
    graph = onnx_graph.load_onnx(model, {"input": (1, 64)})
    x, y = zoo.digits_test_set()
    cal = calibrate(model, graph, x, y, floor=0.005)
    cut_bytes = tuple(graph.crossing_bytes(i) * args.batch for i in range(2))
    problem = Problem(
        layer_names=tuple(layer.name for layer in graph.layers),
        compute_ms=np.array([[ms] * 4 for ms in LAYER_MS]), out_bytes=np.array([*cut_bytes, 40.0 * args.batch]),
        param_bytes=np.array([layer.param_bytes for layer in graph.layers], dtype=float),
        input_bytes=graph.input_bytes * args.batch, device_names=("A", "B", "C", "D"),
        mem_bytes=np.full(4, 1e9), bw_mbps=np.full((4, 4), 100.0), min_bits=cal.min_bits_array(),
        allow_replication=True)
    acc = _accuracy_table(model, graph, x, y)
    rows = []
    for name, adaptive in (("fixed plan, 8-bit", False), ("adaptive bits + re-plan", True)):
        r = simulate(adaptive, seconds=args.seconds, cut_bytes=cut_bytes, min_bits=cal.min_bits, problem=problem)
        bits = r["bits"]
        assert isinstance(bits, Counter)
        n = sum(bits.values())
        loss = sum(c * (acc[(32, 32)] - acc[(dict(k).get(0, 32), dict(k).get(1, 32))]) for k, c in bits.items()) / n
        rows.append((name, r, loss))
    print("SIMULATION (discrete-event, not the MQTT runtime): digits MLP, 3 stages, "
          f"{args.batch} digits/frame, {args.seconds:g} s; bandwidth 100->50->20->100 Mbit/s, "
          f"device B {SLOW_FACTOR:g}x slower from t={SLOW_AT * args.seconds:g} s")
    print(f"calibration (floor 0.5 %, real labels): min bits per cut {list(cal.min_bits)}")
    print(f"{'policy':26} {'frames':>7} {'fps':>7} {'KB/frame':>9} {'acc loss':>9}  re-plans")
    base = rows[0][1]["frames"]
    for name, r, loss in rows:
        frames = r["frames"]
        assert isinstance(frames, int) and isinstance(base, int)
        print(f"{name:26} {frames:7d} {frames / args.seconds:7.1f} {float(r['bytes_per_frame']) / 1000:9.1f} "  # type: ignore[arg-type]
              f"{loss * 100:8.2f}%  {r['replans']}")
    ad = rows[1][1]["frames"]
    assert isinstance(ad, int) and isinstance(base, int)
    print(f"throughput ratio adaptive / fixed: {ad / max(base, 1):.2f}x   (wall {time.perf_counter() - t0:.1f} s)")
    return 0


def _accuracy_table(model: object, graph: object, x: np.ndarray, y: np.ndarray) -> dict[tuple[int, int], float]:
    """Top-1 accuracy on the real labels for every pair of bit-widths at the two cuts (per-sample frames)."""
    s0, s1, s2 = (slicing.make_session(slicing.slice_model(model, graph, i, i)) for i in range(3))
    a0 = np.concatenate([slicing.run_model(s0, {"input": x[i : i + 1]})["fc0/Relu"] for i in range(len(x))])
    out: dict[tuple[int, int], float] = {}
    for b0 in (2, 3, 4, 5, 6, 7, 8, 16, 32):
        q0 = np.concatenate([codec.decode_tensor(codec.encode_tensor(a0[i : i + 1], b0)) for i in range(len(x))])
        a1 = np.concatenate([slicing.run_model(s1, {"fc0/Relu": q0[i : i + 1]})["fc1/Relu"] for i in range(len(x))])
        for b1 in (2, 3, 4, 5, 6, 7, 8, 16, 32):
            q1 = [codec.decode_tensor(codec.encode_tensor(a1[i : i + 1], b1)) for i in range(len(x))]
            logits = np.concatenate([slicing.run_model(s2, {"fc1/Relu": q})["logits"] for q in q1])
            out[(b0, b1)] = float(np.mean(logits.argmax(axis=1) == y))
    return out


if __name__ == "__main__":
    sys.exit(main())
