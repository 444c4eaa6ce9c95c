"""From an intra plan to deployable split assignments: bytes costed as sent, parts that reproduce the units."""

from __future__ import annotations

import itertools
import types

import numpy as np
import pytest

from fleetpipe import codec, wire
from fleetpipe.models import zoo
from fleetpipe.models.onnx_graph import load_onnx
from fleetpipe.models.profile import random_feeds
from fleetpipe.models.slicing import make_session, run_model, slice_model
from fleetpipe.node.split import SplitRole, merge_parts, scatter_part, send_order
from fleetpipe.planner import split_deploy
from fleetpipe.planner.intra import solve_intra
from fleetpipe.planner.loop import ModelInfo, build_problem

pytest.importorskip("onnxruntime")


def _info(name: str, host_ms: float, **kw: object) -> ModelInfo:
    proto = zoo.build(name, **kw)
    graph = load_onnx(proto)
    return ModelInfo("m", proto, graph, np.full(len(graph.layers), host_ms), 1.0)


def _nodes(factors: list[float], bw: float = 940.0) -> dict[str, object]:
    return {f"n{i}": types.SimpleNamespace(birth=types.SimpleNamespace(
        emulate_factor=f, speed=1.0, bandwidth_mbps=bw, mem_bytes=1 << 32, device_class="x"))
        for i, f in enumerate(factors)}


def _plan(model: ModelInfo, factors: list[float], bits: int = 8, bw: float = 940.0,
          tiles: int = 1) -> tuple[object, object, object]:
    problem = build_problem(model, _nodes(factors, bw), bits)
    ip = split_deploy.intra_problem(problem, split_deploy.split_info(model.proto, model.graph), bits)
    return problem, ip, solve_intra(ip, overlap=tiles > 1, tiles=tiles)


def test_exchanged_bytes_are_costed_as_the_codec_sends_them() -> None:
    model = _info("resnet18", 1.0, width=0.25, resolution=32, num_classes=10)
    problem, ip, _ = _plan(model, [2.0, 2.0])
    for layer in (1, 4):
        name = model.graph.inputs_of(layer)[0]
        shape = model.graph.tensors[name].shape
        sent = codec.encode_tensor(np.ones(shape, np.float32), bits=8)
        assert ip.in_bytes[layer] == pytest.approx(problem.in_bytes(layer) / 4)
        assert abs(len(wire.encode(_req(name, sent))) - ip.in_bytes[layer]) < 300  # header only


def _req(name: str, t: object) -> wire.PartRequest:
    return wire.PartRequest("f", 1, 0, "fr", 0, 1, "lead", ((name, t),), 0.0)  # type: ignore[arg-type]


def test_splits_where_compute_dominates_and_not_where_messages_do() -> None:
    model = _info("vgg16", 0.5, width=0.25, resolution=64, fc=64, num_classes=10)
    _, _, fast = _plan(model, [1.0, 1.0])  # 0.5 ms layers: 2 messages of 1 ms never pay
    assert fast.n_split_units == 0
    _, _, slow = _plan(model, [20.0, 20.0])  # 10 ms layers: halving them pays
    assert slow.n_split_units >= 1
    pipe = solve_intra(_plan(model, [20.0, 20.0])[1], modes=("single",))
    assert slow.latency_ms < 0.8 * pipe.latency_ms


@pytest.mark.parametrize(("name", "kw", "factors"), [
    ("vgg16", {"width": 0.25, "resolution": 64, "fc": 64, "num_classes": 10}, [20.0, 30.0, 40.0]),
    ("vit", {"resolution": 32, "patch": 4, "dim": 64, "depth": 2, "heads": 4, "num_classes": 10}, [200.0, 300.0]),
])
def test_deployed_parts_reproduce_every_unit(name: str, kw: dict[str, object], factors: list[float]) -> None:
    """What the lead and part nodes do (node.split scatter/merge over the deployed part slices) == the unit."""
    model = _info(name, 0.5, **kw)
    _, ip, plan = _plan(model, factors)
    names = [f"n{i}" for i in range(len(factors))]
    deployed = split_deploy.deploy(model.proto, model.graph, plan, ip, names)
    split = next(d.split for d in deployed if d.split is not None)
    assert any(u.kind for u in split.units)
    env = dict(random_feeds(model.graph))
    first = split.units[0].first_layer
    for i in range(first):  # the activations entering the split stage
        env.update(run_model(make_session(slice_model(model.proto, model.graph, i, i)), env))
    roles = {n: SplitRole.for_node(split, n) for n in names}
    assert roles[split.lead].lead and not any(r.lead for n, r in roles.items() if n != split.lead)
    blobs = {h: b for d in deployed for h, b in d.blobs.items()}
    for u, unit in enumerate(split.units):
        feeds = {n: env[n] for n in unit.input_names}
        whole = run_model(make_session(blobs[unit.slice_hash]), feeds)
        if unit.kind:
            outs = [run_model(make_session(blobs[p.slice_hash]), scatter_part(feeds, p, unit.input_names))
                    for p in unit.parts]
            got = merge_parts(unit, outs)
            assert set(got) == set(unit.output_names)
            for k, ref in whole.items():
                np.testing.assert_allclose(got[k], ref, rtol=1e-4, atol=1e-4)
            assert all(u in roles[p.node_id].part_index for p in unit.parts)
        env.update(whole)


def test_tiled_parts_reproduce_the_unit_and_first_tiles_go_out_first() -> None:
    """A wide conv on 20 Mbit/s links is split in row tiles, several per node, that merge to the unit."""
    model = _info("wideconv", 0.7, channels=8, resolution=64)
    _, ip, plan = _plan(model, [150.0, 150.0, 150.0], bw=20.0, tiles=4)
    names = ["n0", "n1", "n2"]
    split = next(d.split for d in split_deploy.deploy(model.proto, model.graph, plan, ip, names)
                 if d.split is not None)
    unit = next(u for u in split.units if u.kind)
    t = next(s for s in plan.stages if s.mode == "split").units[0].tiles
    assert unit.kind == "spatial" and t > 1 and len(unit.parts) == t * len({p.node_id for p in unit.parts})
    order = [p.node_id for p in unit.parts]
    assert order == sorted(order, key=order.index)  # a node's tiles are consecutive rows
    rows = [p.inputs[0][2:] for p in unit.parts]
    assert rows[0][0] == 0 and rows[-1][1] == 64 and all(a[0] < b[0] for a, b in itertools.pairwise(rows))
    remote = send_order(unit, split.lead)
    assert [unit.parts[i].node_id for i in remote[:2]] != [unit.parts[remote[0]].node_id] * 2  # tile 0 of each first
    assert sorted(remote) == [i for i, p in enumerate(unit.parts) if p.node_id != split.lead]
    role = SplitRole.for_node(split, split.lead)
    assert len(role.part_index[0]) == t and all(role.serves(0, i) for i in role.part_index[0])
    assert not role.serves(0, remote[0])
    blobs = {h: b for d in split_deploy.deploy(model.proto, model.graph, plan, ip, names) for h, b in d.blobs.items()}
    feeds = dict(random_feeds(model.graph))
    whole = run_model(make_session(blobs[unit.slice_hash]), feeds)
    outs = [run_model(make_session(blobs[p.slice_hash]), scatter_part(feeds, p, unit.input_names)) for p in unit.parts]
    for k, ref in merge_parts(unit, outs).items():
        np.testing.assert_allclose(ref, whole[k], rtol=1e-4, atol=1e-4)


def test_planner_raises_the_message_cost_to_what_split_leads_measure() -> None:
    import dataclasses

    from fleetpipe.config import PlannerConfig
    from fleetpipe.planner.loop import MSG_MS_START, PlannerService

    svc = PlannerService(PlannerConfig(model="zoo:x", intra="latency"), model=_info("vit", 1.0, resolution=32,
                         patch=4, dim=32, depth=1, heads=2, num_classes=10))
    svc.state = dataclasses.replace(svc.state, plan=object(), epoch=3)
    assert svc._exchange_recalibration() is None  # nothing measured
    svc._msg_est = {"lead": MSG_MS_START * 1.2}
    assert svc._exchange_recalibration() is None  # within tolerance of the assumption
    svc._msg_est = {"lead": 7.5, "other": 2.0}
    cmd = svc._exchange_recalibration()
    assert cmd is not None and cmd.epoch == 4 and "7.5 ms" in cmd.reason
    assert svc._msg_ms == 7.5 and not svc._msg_est
    svc._msg_est = {"lead": 9.0}  # only 1.2x the new cost: the plan stays
    assert svc._exchange_recalibration() is None
    fixed = PlannerService(PlannerConfig(model="zoo:x", intra="latency", intra_msg_ms=1.0), model=svc.model)
    fixed.state, fixed._msg_est = svc.state, {"lead": 50.0}
    assert fixed._exchange_recalibration() is None and fixed._msg_ms == 1.0
