"""Measured split parts: time a plan's part slices on this host and cost split units from what they take.

The cost model (``fleetpipe.planner.intra.part_fractions``) assumes a part computes its share of the
unit plus half its halo rows. Part slices measured alone run 1.05-1.75x their share on ResNet-50
(``bench/split_parts.py``): halo rows inside bottleneck blocks, smaller kernels, per-call overhead.
``measure_part_factors`` builds the part slices of every split unit of a plan exactly as ``deploy``
will (same shares, same tiles), times each and the whole unit on one onnxruntime thread (thread CPU
time, warm, median) and returns per part ``measured / (unit x fraction)``: the factor
``IntraProblem.part_factors`` applies to that part's compute on every device. ``solve_measured``
alternates solving and measuring until the plan's split units are all measured (a few rounds: a
measured unit usually costs more than the model said, so the next plan may pick others).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fleetpipe.planner.intra import IntraPlan, IntraProblem, part_fractions, part_key, solve_intra

__all__ = ["MAX_ROUNDS", "cpu_ms", "measure_part_factors", "plan_splits", "solve_measured"]

log = logging.getLogger("fleetpipe.planner")

MAX_ROUNDS = 8
_CLAMP = (0.5, 4.0)  # a factor outside this is a measurement glitch, not a property of the slice


def cpu_ms(session: Any, feeds: Mapping[str, np.ndarray], runs: int) -> float:
    """Median thread CPU time (ms) of ``runs`` runs after one warm-up (the layer profile is warm too)."""
    feeds = {n: np.ascontiguousarray(v) for n, v in feeds.items()}
    session.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.thread_time()
        session.run(None, feeds)
        times.append(time.thread_time() - t)
    return float(np.median(times)) * 1000


def _unit_feeds(session: Any, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d if isinstance(d, int) and d > 0 else 1 for d in i.shape])
            .astype(np.float32) for i in session.get_inputs()}


def measure_part_factors(
    proto: Any, graph: Any, plan: IntraPlan, p: IntraProblem, *, runs: int = 7,
    known: Mapping[tuple[int, int, str, int], Any] | None = None,
) -> dict[tuple[int, int, str, int], tuple[float, ...]]:
    """Part factors of every split unit of ``plan`` not in ``known`` (see the module docstring)."""
    from fleetpipe.models.slicing import make_session
    from fleetpipe.models.split import SplitError
    from fleetpipe.planner.split_deploy import unit_split

    known = dict(known or {})
    out: dict[tuple[int, int, str, int], tuple[float, ...]] = {}
    for st in plan.stages:
        if st.mode != "split":
            continue
        for u in st.units:
            if not u.kind:
                continue
            tiles = max(1, int(u.tiles)) if u.kind == "spatial" else 1
            fr = part_fractions(p, u.first, u.last, u.kind, st.devices, tiles)
            key = part_key(u.first, u.last, u.kind, len(st.devices) * tiles)
            if fr is None or key in known or key in out:
                continue
            try:
                unit, sp, _ = unit_split(proto, graph, st, u, p)
            except SplitError:
                continue  # deploy runs it on the lead; nothing to measure
            whole_sess = make_session(unit)
            feeds = _unit_feeds(whole_sess, u.first)
            whole = max(cpu_ms(whole_sess, feeds, runs), 1e-6)
            factors = []
            for part, pf, frac in zip(sp.parts, sp.scatter(feeds), fr[1], strict=True):
                ms = cpu_ms(make_session(part.model), pf, runs)
                factors.append(float(np.clip(ms / (whole * max(frac, 1e-9)), *_CLAMP)))
            out[key] = tuple(factors)
            log.debug("planner: split unit %d..%d %s x%d parts: measured / model %s", u.first, u.last, u.kind,
                      len(factors), [round(f, 2) for f in factors])
    return out


def solve_measured(
    solve: Callable[[IntraProblem], IntraPlan], make: Callable[[dict], IntraProblem], proto: Any, graph: Any,
    factors: dict[tuple[int, int, str, int], tuple[float, ...]], *, runs: int = 7,
) -> tuple[IntraPlan, IntraProblem]:
    """Solve, measure the plan's unmeasured split units, re-solve with them; until all are measured.

    ``make(factors)`` builds the problem with the factors known so far, ``solve`` plans it; ``factors``
    is updated in place (the caller keeps it across re-plans of the same model).
    """
    ip = make(factors)
    plan = solve(ip)
    for rounds in range(1, MAX_ROUNDS + 1):
        new = measure_part_factors(proto, graph, plan, ip, runs=runs, known=factors)
        if not new:
            log.info("planner: split parts measured (%d units), plan settled after %d rounds", len(factors), rounds)
            break
        factors.update(new)
        ip = make(factors)
        plan = solve(ip)
    else:
        log.warning("planner: split parts still unmeasured after %d rounds; some units cost the model's guess",
                    MAX_ROUNDS)
    return plan, ip


def plan_splits(
    problem: Any, info: Any, proto: Any, graph: Any, *, bits: int, msg_ms: float, tiles: int,
    factors: dict[tuple[int, int, str, int], tuple[float, ...]] | None,
) -> tuple[IntraPlan, IntraProblem]:
    """The min-latency plan with single, replicated and split stages (tiles up to ``tiles``) and its problem.

    ``factors`` None costs split parts with the model alone; a dict (the caller's, updated in place) has
    them measured on this host (``solve_measured``).
    """
    from fleetpipe.planner import split_deploy

    def make(f: dict) -> IntraProblem:
        return split_deploy.intra_problem(problem, info, bits, msg_ms, f)

    def solve(q: IntraProblem) -> IntraPlan:
        return solve_intra(q, overlap=tiles > 1, tiles=tiles)

    if factors is None:
        ip = make({})
        return solve(ip), ip
    return solve_measured(solve, make, proto, graph, factors)
