"""Measured split parts: part slices timed on the host cost split units instead of the model's guess."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fleetpipe.planner import split_deploy
from fleetpipe.planner.intra import part_fractions, part_key, solve_intra, unit_cost_ms
from fleetpipe.planner.loop import build_problem
from fleetpipe.planner.split_profile import measure_part_factors, solve_measured
from tests.intra.test_intra_planner import _problem
from tests.intra.test_split_deploy import _info, _nodes

pytest.importorskip("onnxruntime")


def test_part_factors_scale_the_parts_compute() -> None:
    p = _problem(bw=1000.0)  # a 400 ms layer 2, spatially split on 4 devices
    group = (0, 1, 2, 3)
    shares, fracs = part_fractions(p, 2, 2, "spatial", group)
    assert sum(shares) == pytest.approx(1.0) and all(f >= w for f, w in zip(fracs, shares, strict=True))
    base = unit_cost_ms(p, 2, 2, "spatial", group, 0)
    slow = dataclasses.replace(p, part_factors={part_key(2, 2, "spatial", 4): (1.0, 1.0, 1.5, 1.0)})
    # The slowest part sets the unit's compute: one part 1.5x slower costs half its compute more.
    assert unit_cost_ms(slow, 2, 2, "spatial", group, 0) == pytest.approx(base + 0.5 * 400.0 * fracs[2], rel=1e-6)
    wrong = dataclasses.replace(p, part_factors={part_key(2, 2, "spatial", 4): (9.0,)})  # other part count: unused
    assert unit_cost_ms(wrong, 2, 2, "spatial", group, 0) == pytest.approx(base)
    prior = dataclasses.replace(p, part_prior={"spatial": 1.2})  # an unmeasured part: the kind's prior
    assert unit_cost_ms(prior, 2, 2, "spatial", group, 0) == pytest.approx(base + 0.2 * 400.0 * max(fracs), rel=1e-6)
    priors = split_deploy.part_priors({(0, 1, "spatial", 2): (1.0, 1.4), (3, 3, "spatial", 2): (1.2, 2.0),
                                       (4, 4, "channel", 2): (1.1, 1.1)})
    assert priors == pytest.approx({"spatial": 1.3, "channel": 1.1})
    with pytest.raises(ValueError, match="part factors"):
        dataclasses.replace(p, part_factors={part_key(2, 2, "spatial", 4): (0.0,) * 4})


def test_measured_parts_of_a_real_split_and_the_plan_they_lead_to() -> None:
    model = _info("vgg16", 0.5, width=0.25, resolution=64, fc=64, num_classes=10)
    problem = build_problem(model, _nodes([20.0, 30.0, 40.0]), 8)
    info = split_deploy.split_info(model.proto, model.graph)

    def make(f: dict) -> object:
        return split_deploy.intra_problem(problem, info, 8, 1.0, f)

    ip = make({})
    plan = solve_intra(ip)
    factors = measure_part_factors(model.proto, model.graph, plan, ip, runs=3)
    split = [(u, s) for s in plan.stages if s.mode == "split" for u in s.units if u.kind]
    assert split and len(factors) >= 1
    for key, fs in factors.items():
        assert len(fs) == key[3] and all(0.5 <= f <= 4.0 for f in fs), (key, fs)
    assert measure_part_factors(model.proto, model.graph, plan, ip, runs=3, known=factors) == {}
    known: dict = {}
    final, fip = solve_measured(solve_intra, make, model.proto, model.graph, known, runs=3)
    assert known and fip.part_factors == known
    for s in final.stages:  # every split unit of the final plan is costed from its measured parts
        for u in s.units:
            if u.kind and part_fractions(fip, u.first, u.last, u.kind, s.devices, u.tiles) is not None:
                assert part_key(u.first, u.last, u.kind, len(s.devices) * u.tiles) in known
                assert u.latency_ms == pytest.approx(unit_cost_ms(fip, u.first, u.last, u.kind, s.devices, s.lead))
    assert np.isfinite(final.latency_ms)
