"""What the planner service folds from the bus: retained plans of another model, node layer profiles."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from fleetpipe import topics, wire
from fleetpipe.config import PlannerConfig
from fleetpipe.models import zoo
from fleetpipe.models.onnx_graph import load_onnx
from fleetpipe.planner.loop import ModelInfo, PlannerService


def _service() -> PlannerService:
    proto = zoo.build("resnet18", width=0.25, resolution=32, num_classes=10)
    graph = load_onnx(proto)
    model = ModelInfo("mine", proto, graph, np.full(len(graph.layers), 0.5), 10.0)
    return PlannerService(PlannerConfig(model="zoo:x", fleet="lab"), model=model)


def _plan(model_id: str, epoch: int) -> wire.Plan:
    stage = wire.PlanStage(0, 0, 9, ("n1",), 32, "", ("input",), ("out",), 1.0)
    return wire.Plan("lab", epoch, model_id, (stage,), 1.0, 1.0, 1.0)


def _message(topic: str, msg: object) -> SimpleNamespace:
    return SimpleNamespace(topic=topic, payload=wire.encode(msg))  # type: ignore[arg-type]


def test_a_retained_plan_of_another_model_is_superseded_not_resumed() -> None:
    svc = _service()
    svc._fold(_message(topics.plan("lab"), _plan("someone-else", 4)))
    assert svc.state.plan is None and svc.state.epoch == 4  # the next plan is epoch 5 and replaces it
    svc._fold(_message(topics.plan("lab"), _plan("mine", 6)))
    assert svc.state.plan is not None and svc.state.plan.epoch == 6  # our model: resumed


def test_node_profiles_of_this_model_reach_the_cost_matrix() -> None:
    svc = _service()
    prof = wire.NodeProfile("lab", "n1", 1.0, "mine", 2, 4, (1.0, 2.0, 3.0))
    svc._fold(_message(topics.node_profile("lab", "n1"), prof))
    svc._fold(_message(topics.node_profile("lab", "n2"), wire.NodeProfile("lab", "n2", 1.0, "other", 0, 0, (9.0,))))
    assert svc.costs.reports == {"n1": {2: 1.0, 3: 2.0, 4: 3.0}}
    forged = wire.NodeProfile("lab", "n1", 2.0, "mine", 0, 0, (99.0,))  # n3 writing n1's costs
    with pytest.raises(ValueError, match="NodeProfile naming node_id='n1'"):
        svc._fold(_message(topics.node_profile("lab", "n3"), forged))
    assert 0 not in svc.costs.reports["n1"]
    birth = SimpleNamespace(speed=10.0, emulate_factor=2.0)
    compute = svc._compute_ms({"n1": SimpleNamespace(birth=birth), "n2": SimpleNamespace(birth=birth)})
    assert compute is not None
    np.testing.assert_allclose(compute[2:5, 0], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(compute[0, 0], 0.5 * 4.0)  # n1's median measured ratio (2.0 / 0.5)
    np.testing.assert_allclose(compute[:, 1], 0.5 * 2.0)  # n2 reported nothing for this model: its factor


def test_births_deaths_and_health_naming_another_node_are_refused() -> None:
    """Identity from the topic (the ACL binds it): n0 cannot announce, kill or report for another node."""
    svc = _service()
    birth = wire.NodeBirth("lab", "n1", 5, 1.0, "x86_64", 4, 2**30, ("onnx",), ("CPUExecutionProvider",), "host", 1.0)
    svc._fold(_message(topics.node_state("lab", "n1"), birth))
    assert svc.state.nodes["n1"].alive
    lies = [(topics.node_state("lab", "n0"), wire.NodeDeath("lab", "n1", 2**62, 2.0, "forged")),
            (topics.node_state("lab", "n0"), dataclasses.replace(birth, node_id="ghost", seq=2**62)),
            (topics.node_health("lab", "n0"), wire.NodeHealth("lab", "n1", 5, 2.0, load=99.0)),
            (topics.node_state("lab", "n1"), dataclasses.replace(birth, fleet="other"))]
    for topic, msg in lies:
        with pytest.raises(ValueError, match=r"naming|fleet"):
            svc._fold(_message(topic, msg))
    assert set(svc.state.nodes) == {"n1"} and svc.state.nodes["n1"].alive
