"""The exact solver against an independent brute force on random small instances."""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetpipe.errors import InfeasiblePlan
from fleetpipe.planner.cost import evaluate
from fleetpipe.planner.partition import solve
from fleetpipe.planner.problem import Pin, Problem

EXAMPLES = int(os.environ.get("ORACLE_EXAMPLES", "120"))  # more for a thorough run
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def compositions(n: int):
    """All ways to cut 0..n-1 into contiguous non-empty (first, last) ranges."""
    for k in range(n):
        for cuts in itertools.combinations(range(1, n), k):
            bounds = (0, *cuts, n)
            yield [(bounds[i], bounds[i + 1] - 1) for i in range(len(bounds) - 1)]


def brute(p: dict, replicas_by_type: bool = False) -> tuple[float, float] | None:
    """(min bottleneck, min latency among those) by enumeration, straight from the README formulas."""
    comp, out, par = p["compute"], p["out"], p["params"]
    n_l, n_d = comp.shape
    best = None
    groups = [(d,) for d in range(n_d)]
    if replicas_by_type:
        for t in set(p["types"]):
            members = [d for d in range(n_d) if p["types"][d] == t]
            for k in range(2, len(members) + 1):
                groups.extend(itertools.combinations(members, k))
    for parts in compositions(n_l):
        for assign in itertools.permutations(groups, len(parts)):
            flat = [d for g in assign for d in g]
            if len(set(flat)) != len(flat):
                continue
            if not _pins_ok(p, parts, assign):
                continue
            times, lat, ok = [], 0.0, True
            for k, ((f, la), g) in enumerate(zip(parts, assign, strict=True)):
                c = float(sum(comp[f : la + 1, g[0]]))
                if "hop" in p:  # the stage's own messages: fixed + per byte received and sent
                    got = p["input"] if f == 0 else out[f - 1] * p["bits"][f - 1] / 32
                    sent = out[la] if la == n_l - 1 else out[la] * p["bits"][la] / 32
                    c += p["hop"][g[0]] + p["byte"][g[0]] * (got + sent)
                if "client" in p:  # input from and result to the client, on each replica's own link
                    for nbytes, here in ((p["input"], f == 0), (out[n_l - 1], la == n_l - 1)):
                        if here:
                            t = nbytes * 8 / (p["client"][g[0]] * 1000)
                            times.append(t / len(g))
                            lat += t
                need = sum(par[f : la + 1]) + (p["input"] if f == 0 else out[f - 1]) + out[la]
                if any(need >= p["mem"][d] for d in g):
                    ok = False
                    break
                times.append(c / len(g))
                lat += c
                if k + 1 < len(parts):
                    nxt = assign[k + 1]
                    nbytes = out[la] * p["bits"][la] / 32
                    t = nbytes * 8 / (p["bw"][g[0], nxt[0]] * 1000)
                    times.append(t / (len(g) * len(nxt)))
                    lat += t
            if not ok:
                continue
            if p.get("bound") is not None and lat > p["bound"] + 1e-9:
                continue
            cand = (max(times), lat)
            if best is None or cand[0] < best[0] - 1e-9 or (abs(cand[0] - best[0]) <= 1e-9 and cand[1] < best[1]):
                best = cand
    return best


def _pins_ok(p: dict, parts, assign) -> bool:
    for first, last, dev in p.get("pins", ()):
        if not any(f <= first and last <= la and g == (dev,) for (f, la), g in zip(parts, assign, strict=False)):
            return False
    return True


@st.composite
def instances(draw, max_layers: int = 7, max_devices: int = 4, extensions: bool = False):
    n_l = draw(st.integers(1, max_layers))
    n_d = draw(st.integers(1, max_devices))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_types = draw(st.integers(1, n_d))
    types = [int(rng.integers(0, n_types)) for _ in range(n_d)]
    speed = rng.uniform(0.5, 4.0, n_types)
    work = rng.integers(1, 40, n_l).astype(float)
    compute = np.array([[round(work[i] * speed[types[d]], 3) for d in range(n_d)] for i in range(n_l)])
    out = rng.integers(1, 20, n_l).astype(float) * 1e5
    params = rng.integers(0, 50, n_l).astype(float) * 1e6
    uniform_links = draw(st.booleans()) if extensions else False
    if uniform_links:
        bw = np.full((n_d, n_d), float(rng.choice([50.0, 100.0, 400.0])))
    else:
        bw = rng.choice([20.0, 50.0, 100.0, 300.0, 1000.0], (n_d, n_d))
    total = params.sum() + out.max() * 2 + 1e6
    mem_scale = draw(st.sampled_from([0.8, 1.2, 1.6, 2.2, 100.0]))  # small: memory binds or is short
    mem = np.array([total / n_d * mem_scale * rng.uniform(0.7, 1.3) for _ in range(n_d)])
    for d in range(n_d):  # devices of one type share memory (interchangeable when links agree)
        mem[d] = mem[types.index(types[d])]
    return {"compute": compute, "out": out, "params": params, "input": 3e5, "mem": mem, "bw": bw,
            "types": types, "bits": [32] * n_l}


def to_problem(p: dict, **extra) -> Problem:
    n_l, n_d = p["compute"].shape
    return Problem(layer_names=tuple(f"l{i}" for i in range(n_l)), compute_ms=p["compute"],
                   out_bytes=p["out"], param_bytes=p["params"], input_bytes=p["input"],
                   device_names=tuple(f"d{i}" for i in range(n_d)), mem_bytes=p["mem"], bw_mbps=p["bw"],
                   **extra)


def check(p: dict, problem: Problem, replicas: bool = False) -> None:
    expect = brute(p, replicas)
    if expect is None:
        with pytest.raises(InfeasiblePlan):
            solve(problem, time_limit_s=5)
        return
    res = solve(problem, time_limit_s=5)
    assert res.exact and res.gap == 0.0
    assert res.report.feasible, res.report.reason
    assert math.isclose(res.bottleneck_ms, expect[0], rel_tol=1e-9, abs_tol=1e-9)
    assert res.latency_optimal
    assert math.isclose(res.latency_ms, expect[1], rel_tol=1e-9, abs_tol=1e-9)
    again = evaluate(problem, res.stages)
    assert again.bottleneck_ms == res.report.bottleneck_ms


@SETTINGS
@given(instances())
def test_exact_matches_brute_force(p: dict) -> None:
    check(p, to_problem(p))


@SETTINGS
@given(instances(max_layers=6, extensions=True), st.data())
def test_exact_matches_brute_force_with_extensions(p: dict, data: st.DataObject) -> None:
    n_l, n_d = p["compute"].shape
    extra: dict = {}
    if data.draw(st.booleans(), label="bits"):
        bits = data.draw(st.lists(st.sampled_from([2, 4, 8, 16, 32]), min_size=n_l, max_size=n_l))
        extra["min_bits"] = bits
        p["bits"] = bits
    if data.draw(st.booleans(), label="pin"):
        first = data.draw(st.integers(0, n_l - 1))
        last = data.draw(st.integers(first, n_l - 1))
        dev = data.draw(st.integers(0, n_d - 1))
        extra["pins"] = (Pin(first, last, dev),)
        p["pins"] = [(first, last, dev)]
    if data.draw(st.booleans(), label="bound"):
        free = brute(p)
        if free is not None:
            factor = data.draw(st.sampled_from([0.9, 1.0, 1.05, 1.3]))
            extra["latency_bound_ms"] = free[1] * factor
            p["bound"] = free[1] * factor
    check(p, to_problem(p, **extra))


def test_greedy_never_picks_a_device_that_reaches_no_layer() -> None:
    """Found by hypothesis: greedy rule 2 ("within one layer of the furthest") took a device reaching no
    layer when the furthest reach was 0, an empty stage 1..0 that the heuristic start then failed on."""
    p = {"compute": np.array([[20.933, 41.206, 53.531, 20.933], [40.634, 79.988, 103.914, 40.634]]),
         "out": np.array([1.1e6, 1.6e6]), "params": np.array([3.3e7, 4.2e7]), "input": 3e5,
         "mem": np.array([53711483.8, 37503766.5, 34650557.1, 53711483.8]),
         "bw": np.array([[20.0, 300, 50, 20], [50, 300, 50, 20], [100, 1000, 100, 300], [50, 20, 50, 20]]),
         "types": [3, 0, 2, 3], "bits": [2, 4]}
    from fleetpipe.planner.heuristic import greedy_plan

    problem = to_problem(p, min_bits=p["bits"])
    assert all(s.first <= s.last for s in greedy_plan(problem))
    check(p, problem)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(max_layers=5, max_devices=4, extensions=True))
def test_exact_matches_brute_force_with_replication(p: dict) -> None:
    n_d = len(p["types"])
    p["bw"] = np.full((n_d, n_d), p["bw"][0, 0 if n_d == 1 else 1])  # identical links: types are classes
    check(p, to_problem(p, allow_replication=True), replicas=True)


@SETTINGS
@given(instances(max_layers=7, max_devices=4, extensions=True))
def test_heuristic_reports_what_the_cost_model_scores(p: dict) -> None:
    """The fast re-planner never claims a plan better (or other) than the cost model scores it."""
    from fleetpipe.planner import heuristic

    problem = to_problem(p)
    expect = brute(p)
    try:
        res = heuristic.refine(problem, None, time_limit_s=0.05)
    except InfeasiblePlan:
        # The heuristic is not complete: under tight memory it may find no plan where one exists (hypothesis
        # found 3 layers on 3 devices); the exact solver covers that. It claims nothing then, so nothing to check.
        return
    again = evaluate(problem, res.stages)
    assert res.report == again
    assert res.bottleneck_ms == again.bottleneck_ms
    if again.feasible:
        assert expect is not None and res.bottleneck_ms >= expect[0] - 1e-9  # never beats the optimum


@st.composite
def with_messages(draw, replicas: bool = False):
    """Instances whose messages cost: a fixed and a per-byte cost per device type, a client link per device."""
    p = draw(instances(max_layers=5 if replicas else 6, max_devices=4, extensions=True))
    n_d = len(p["types"])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_t = max(p["types"]) + 1
    hop_t = rng.choice([0.0, 0.5, 2.0, 8.0], n_t)
    byte_t = rng.choice([0.0, 1e-6, 1e-5], n_t)
    client_t = rng.choice([20.0, 100.0, 1000.0], n_t)
    p["hop"] = [float(hop_t[t]) for t in p["types"]]
    p["byte"] = [float(byte_t[t]) for t in p["types"]]
    p["client"] = [float(client_t[t]) for t in p["types"]]
    if replicas:
        p["bw"] = np.full((n_d, n_d), p["bw"][0, 0 if n_d == 1 else 1])
    return p


def _message_problem(p: dict, **extra) -> Problem:
    return to_problem(p, hop_ms=p["hop"], byte_ms=p["byte"], client_mbps=p["client"], **extra)


@SETTINGS
@given(with_messages())
def test_exact_matches_brute_force_with_message_costs(p: dict) -> None:
    """Per-hop fixed and per-byte costs and the client's links (fleetpipe#23) keep the solver exact."""
    check(p, _message_problem(p))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(with_messages(replicas=True))
def test_exact_matches_brute_force_with_message_costs_and_replicas(p: dict) -> None:
    check(p, _message_problem(p, allow_replication=True), replicas=True)


def test_a_costly_hop_keeps_a_tiny_model_on_one_device() -> None:
    """A few-MFLOP model: 4 stages would each pay a 2.5 ms hop for 0.1 ms of compute; one device wins."""
    n_l, n_d = 4, 4
    p = {"compute": np.full((n_l, n_d), 0.1), "out": np.full(n_l, 4e3), "params": np.full(n_l, 1e5),
         "input": 4e3, "mem": np.full(n_d, 1e9), "bw": np.full((n_d, n_d), 1e4), "types": [0] * n_d,
         "bits": [32] * n_l}
    free = solve(to_problem(p))
    assert len(free.stages) == 4  # the classic model: messages are free, so cut everywhere
    # Each device pays its own hop, so by the stages alone 4 stages still win (2.6 ms per stage against 2.9)...
    costly = solve(to_problem(p, hop_ms=[2.5] * n_d, byte_ms=[0.0] * n_d))
    assert len(costly.stages) == 4 and costly.bottleneck_ms == pytest.approx(2.6)
    # ... but the broker relays every message of a frame (5 with 4 stages, 2 with one) and a client with 8
    # frames in flight waits a whole latency per 8: one device wins.
    shared = to_problem(p, hop_ms=[2.5] * n_d, byte_ms=[0.0] * n_d, broker_msg_ms=1.0, window=8)
    res = solve(shared)
    assert len(res.stages) == 1 and res.report.period_ms == pytest.approx(2.9)
    assert evaluate(shared, costly.stages).period_ms == pytest.approx(5.0)
    assert "1 stage(s) instead of 4" in res.notes and not res.exact


def test_the_result_hop_keeps_a_big_result_off_the_slow_link() -> None:
    """A 3 MB result: the last stage goes to the device with the fast link to the client, not the Wi-Fi one."""
    p = {"compute": np.array([[10.0, 10.0], [10.0, 10.0]]), "out": np.array([1e5, 3e6]),
         "params": np.array([1e6, 1e6]), "input": 1e5, "mem": np.full(2, 1e9),
         "bw": np.full((2, 2), 1000.0), "types": [0, 1], "bits": [32, 32]}
    res = solve(to_problem(p, client_mbps=[1000.0, 40.0]))
    assert res.stages[-1].devices == (0,)
    report = evaluate(to_problem(p, client_mbps=[1000.0, 40.0]), res.stages)
    assert report.stages[-1].transfer_ms == pytest.approx(3e6 * 8 / 1000.0 / 1000.0)
    assert report.bottleneck_ms == res.bottleneck_ms
