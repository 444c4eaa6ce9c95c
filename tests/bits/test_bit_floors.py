"""Bit floors at plan time (issue 18.4): never ship a width whose output error exceeds the tolerance."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fleetpipe import wire
from fleetpipe.accuracy import compare_outputs, is_classifier_shaped
from fleetpipe.models.calibrate import calibrate
from fleetpipe.models.onnx_graph import load_onnx
from fleetpipe.planner.bitwidth import FloorFinder, choose_bits, plan_with_floors, probe_inputs
from fleetpipe.planner.loop import load_model_info
from tests.bits._outlier import outlier_map


@pytest.fixture(scope="module")
def outlier():
    model = outlier_map()
    return model, load_onnx(model)


def test_eight_bits_exceed_the_tolerance_so_the_planner_ships_more(outlier):
    model, graph = outlier
    finder = FloorFinder(model, graph)
    assert [finder.error(c, 8) for c in (0, 1)] > [0.1, 0.1]  # 8 bits: clearly over 1 %
    plan = choose_bits(model, graph, [0, 1], 8)
    assert plan.source == "probe tolerance"
    assert [c.bits for c in plan.choices] == [16, 16]
    assert all(c.error is not None and c.error <= 0.01 for c in plan.choices)
    assert plan.end_to_end is not None and plan.end_to_end <= 0.01
    assert "raised from 8" in plan.summary()


def test_the_fleet_error_at_the_chosen_widths_is_within_tolerance_on_other_inputs(outlier):
    model, graph = outlier
    finder = FloorFinder(model, graph, feeds=probe_inputs(graph, seed=7))  # inputs the choice never saw
    assert finder.chain_error({0: 16, 1: 16}) <= 0.01
    assert finder.chain_error({0: 8, 1: 8}) > 0.1


def test_the_solver_is_re_run_with_the_floor_of_each_cut_it_picks(outlier):
    model, graph = outlier
    calls = []

    def solve(min_bits):  # a one-cut plan after layer 1, at whatever width the floors allow
        calls.append(min_bits.tolist())
        from types import SimpleNamespace

        return SimpleNamespace(stages=[SimpleNamespace(first=0, last=1, bits=int(min_bits[1])),
                                       SimpleNamespace(first=2, last=2, bits=32)])

    result, plan = plan_with_floors(solve, 3, 8, finder=FloorFinder(model, graph))
    assert calls[0] == [8, 8, 8] and calls[-1][1] == 16
    assert result.stages[0].bits == 16 and plan.floor_of(1) == 16


def test_a_within_tolerance_model_keeps_the_requested_bits():
    from fleetpipe.models import zoo

    model = zoo.build("resnet18", width=0.125, resolution=32)
    graph = load_onnx(model)
    plan = choose_bits(model, graph, [3], 8)
    assert [c.bits for c in plan.choices] == [8] and "within it" in plan.summary()


def test_with_a_calibration_set_the_coach_floors_are_used(outlier, tmp_path):
    model, graph = outlier
    rng = np.random.default_rng(3)
    x = rng.random((6, 3, 16, 16)).astype(np.float32)
    cal = calibrate(model, graph, x, bits_candidates=(2, 4, 8, 16), floor=0.01)
    assert cal.metric == "rel_l2" and list(cal.min_bits) == [16, 16]
    plan = choose_bits(model, graph, [0], 8, calibration=cal)
    assert plan.source == "calibrated floor" and plan.choices[0].bits == 16
    assert "calibrated floor" in plan.summary()
    # sample inputs as .npy: the planner calibrates on them (COACH floors), whatever --bits says
    import onnx

    from fleetpipe.config import PlannerConfig
    from fleetpipe.planner.loop import _load_calibration

    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.save(tmp_path / "samples.npy", x)
    info = load_model_info(str(path))
    loaded = _load_calibration(PlannerConfig(model=str(path), calibration=str(tmp_path / "samples.npy")), info)
    assert list(loaded.min_bits) == [16, 16]


def test_plan_command_prints_the_bits_per_cut_and_why(outlier, tmp_path, capsys):
    import onnx

    from fleetpipe.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(outlier[0], path)
    # fast links: the plan pipelines the layers over the devices, so there are cuts to choose widths for
    (tmp_path / "fleet.toml").write_text("".join(f'[[device]]\nname = "{n}"\nclass = "rpi3"\nbandwidth_mbps = 100000\n'
                                                 for n in "abc"))
    code = main(["plan", "--model", str(path), "--fleet", str(tmp_path / "fleet.toml"), "--bits", "8", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    bits = doc["bit_widths"]
    assert bits["source"] == "probe tolerance" and len(doc["stages"]) >= 2 and bits["cuts"]
    assert all(c["bits"] >= 16 for c in bits["cuts"])
    assert [s["bits"] for s in doc["stages"][:-1]] == [c["bits"] for c in bits["cuts"]]
    # with a calibration of this model the plan ships its floors and says so
    info = load_model_info(str(path))
    x = np.random.default_rng(1).random((3, 3, 16, 16)).astype(np.float32)
    cal = calibrate(info.proto, info.graph, x, bits_candidates=(4, 8, 16), floor=0.01, model_id=info.model_id)
    (tmp_path / "calib.json").write_text(cal.to_json())
    code = main(["plan", "--model", str(path), "--fleet", str(tmp_path / "fleet.toml"), "--bits", "8",
                 "--calibration", str(tmp_path / "calib.json"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["bit_widths"]["source"] == "calibrated floor"
    assert all(c["bits"] == cal.min_bits[c["after_layer"]] for c in doc["bit_widths"]["cuts"])


def test_classifier_shape_decides_top1():
    assert is_classifier_shaped((1, 10)) and is_classifier_shaped((10,)) and is_classifier_shaped((4, 3))
    assert not any(is_classifier_shaped(s) for s in [(1, 1), (1,), (1, 1, 16, 16), (1, 100, 4), ()])
    ref = [{"map": np.linspace(0, 1, 256, dtype=np.float32).reshape(1, 1, 16, 16),
            "cls": np.array([[0.1, 0.7, 0.2]], np.float32)}]
    got = [{"map": ref[0]["map"] * 1.05, "cls": np.array([[0.1, 0.2, 0.7]], np.float32)}]
    check = compare_outputs(got, ref)
    by = {o.name: o for o in check.outputs}
    assert by["map"].top1 is None and by["cls"].top1 == 0.0
    assert by["map"].rel_l2 == pytest.approx(0.05, rel=1e-3) and not check.ok
    assert "EXCEEDS" in check.lines()[-1]
    assert compare_outputs(ref, ref).ok


def test_the_floor_travels_in_the_assignment_and_old_messages_still_decode():
    assign = wire.StageAssign(fleet="f", node_id="n", epoch=1, stage=0, n_stages=2, first_layer=0, last_layer=1,
                              model_id="m", slice_hash="", slice_size=1, ts=0.0, bits=16, min_bits=16)
    assert wire.decode(wire.encode(assign)) == assign
    old = wire.StageAssign(fleet="f", node_id="n", epoch=1, stage=0, n_stages=2, first_layer=0, last_layer=1,
                           model_id="m", slice_hash="", slice_size=1, ts=0.0, bits=8)
    assert b"min_bits" not in wire.encode(old)  # an older node decodes it (unknown fields are rejected)
    assert wire.decode(wire.encode(old)).min_bits is None
    with pytest.raises(ValueError, match="min_bits"):
        wire.StageAssign(fleet="f", node_id="n", epoch=1, stage=0, n_stages=2, first_layer=0, last_layer=1,
                         model_id="m", slice_hash="", slice_size=1, ts=0.0, bits=8, min_bits=16)


def test_check_outputs_exits_non_zero_over_the_tolerance(outlier, tmp_path, capsys):
    import onnx

    from fleetpipe.client_cli import check_outputs
    from fleetpipe.models.slicing import make_session, run_model

    path = tmp_path / "m.onnx"
    onnx.save(outlier[0], path)
    xs = [np.random.default_rng(i).random((1, 3, 16, 16)).astype(np.float32) for i in range(3)]
    sess = make_session(outlier[0])
    exact = [run_model(sess, {"x": x}) for x in xs]
    assert check_outputs(str(path), xs, exact) == 0
    assert check_outputs(str(path), xs, [{"prob": r["prob"] * 1.02} for r in exact]) == 1
    out = capsys.readouterr().out
    assert "prob (1, 1, 16, 16): rel L2" in out and "EXCEEDS" in out and "top-1" not in out


def test_tflite_floors_are_probed_with_litert(tmp_path):
    pytest.importorskip("ai_edge_litert")
    from fleetpipe.models.onnx_to_tflite import onnx_to_tflite
    from fleetpipe.models.source import open_model

    path = tmp_path / "outlier.tflite"
    path.write_bytes(onnx_to_tflite(outlier_map(16)))
    loaded = open_model(str(path))
    assert loaded.kind == "tflite"
    plan = choose_bits(loaded.model, loaded.graph, [0], 8, loaded=loaded)
    assert plan.choices[0].bits == 16 and plan.end_to_end is not None and plan.end_to_end <= 0.01
    assert FloorFinder(loaded.model, loaded.graph, loaded=loaded).error(0, 8) > 0.1


def test_an_unprobeable_model_ships_32_bits_never_the_unchecked_width(monkeypatch):
    from types import SimpleNamespace

    import fleetpipe.planner.problem as problem_mod
    from fleetpipe.planner.bitwidth import solve_problem

    graph = SimpleNamespace(inputs=(), outputs=(), layers=(0, 1, 2), crossing=lambda c: ())
    finder = FloorFinder(b"not a model", graph)  # neither ONNX nor a loaded TFLite model
    monkeypatch.setattr(problem_mod, "_replace", lambda p, **kw: SimpleNamespace(**{**vars(p), **kw}))
    said: list[str] = []

    def solve(p):
        return SimpleNamespace(stages=[SimpleNamespace(first=0, last=0, bits=int(p.min_bits[0])),
                                       SimpleNamespace(first=1, last=2, bits=32)])

    _, result, _ = solve_problem(SimpleNamespace(layer_names=("a", "b", "c")), solve, 8, finder=finder,
                                 warn=said.append)
    assert result.stages[0].bits == 32 and "32 bits at every cut" in said[0]


def test_calibrate_cli_output_is_what_the_planner_uses(tmp_path):
    import onnx

    from fleetpipe.cli import main
    from fleetpipe.config import PlannerConfig
    from fleetpipe.planner.loop import _load_calibration

    path = tmp_path / "m.onnx"
    onnx.save(outlier_map(), path)
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).random((4, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "calib.json"
    assert main(["calibrate", "--model", str(path), "--input-shape", "x=1,3,16,16", "--data",
                 str(tmp_path / "data.npz"), "--floor", "0.01", "-o", str(out)]) == 0
    info = load_model_info(str(path))
    cal = _load_calibration(PlannerConfig(model=str(path), calibration=str(out)), info)  # same model id
    assert list(cal.min_bits) == [16, 16]  # 8 bits miss the 1 % floor: the candidates include 16


def test_tolerance_and_floors_come_from_the_planner_toml_env_and_flags(tmp_path):
    from fleetpipe.config import PlannerConfig, load
    from fleetpipe.errors import ConfigError

    toml = tmp_path / "planner.toml"
    toml.write_text('[planner]\nmodel = "m.onnx"\nbit_tolerance = 0.02\nbit_floors = false\n')
    cfg = load(PlannerConfig, file=toml)
    assert cfg.bit_tolerance == 0.02 and cfg.bit_floors is False
    assert load(PlannerConfig, file=toml, env={"FLEETPIPE_BIT_TOLERANCE": "0.005"}).bit_tolerance == 0.005
    assert load(PlannerConfig, flags={"model": "m", "bit_tolerance": 0.03}).bit_tolerance == 0.03
    with pytest.raises(ConfigError, match="bit_tolerance"):
        PlannerConfig(model="m", bit_tolerance=0.0)


@pytest.mark.parametrize(("floor", "want"), [(None, 6), (8, 8)])
def test_node_bit_relief_never_goes_below_the_floor_the_assignment_carries(tmp_path, floor, want):
    """COACH relief lowers a clearly separable frame's width by up to 2 bits on a slow link, but the
    assignment's ``min_bits`` (the cut's accuracy floor) stops it; an older assignment (None) does not."""
    from fleetpipe.config import NodeConfig
    from fleetpipe.context import SemanticCache
    from fleetpipe.node.daemon import NodeDaemon, _Slot

    daemon = NodeDaemon(NodeConfig(name="n", cache_dir=str(tmp_path)))
    assign = wire.StageAssign(fleet="default", node_id="n", epoch=1, stage=0, n_stages=2, first_layer=0,
                              last_layer=0, model_id="m", slice_hash="", slice_size=1, ts=0.0, output_names=("y",),
                              bits=8, min_bits=floor, next_stage=1)
    slot = _Slot(assign=assign, runtime=None, executor=None, topic="t",  # type: ignore[arg-type]
                 exit_cache=SemanticCache(2, 4, threshold=1.0))
    outputs = {"y": np.zeros((1, 1 << 16), np.float32)}
    daemon._choose_bits(slot, outputs, 1.0, 10.0)  # creates the link's adaptive state
    for _ in range(8):  # a link far too slow for any width: the lowest allowed one wins
        slot.adaptive.observe_transfer(1 << 20, 10.0)
    assert daemon._choose_bits(slot, outputs, 1.0, 10.0) == want


def test_rel_l2_ignores_what_the_reference_cannot_give_and_flags_what_the_fleet_breaks():
    from fleetpipe.accuracy import rel_l2

    ref = np.array([1.0, -np.inf, 2.0, np.nan])
    assert rel_l2(np.array([1.0, 0.0, 2.0, 5.0]), ref) == 0.0
    assert rel_l2(np.array([np.nan, 0.0, 2.0, 0.0]), ref) == np.inf
    assert rel_l2(np.zeros(3), np.zeros(3)) == 0.0 and rel_l2(np.zeros(2), np.zeros(3)) == np.inf


def test_a_real_text_detector_needs_more_than_8_bits_and_the_page_probe_shows_it():
    """PP-OCR v4 det (paddle2onnx, from the corpus): on noise its probability map is empty (relative error
    there measures nothing and is not judged); on the text-like page probe 8 bits miss 1 %, 16 bits do not."""
    from fleetpipe.models.source import open_model
    from fleetpipe.planner.bitwidth import PROBES
    from tests.realmodels.corpus import by_id, resolve

    loaded = open_model(str(resolve(by_id("ppocr_det_v4"))), {"x": (1, 3, 160, 160)})
    finder = FloorFinder(loaded.model, loaded.graph)
    assert finder.error(6, 8) > 0.01 and finder.error(6, 16) <= 0.01
    assert finder.floor(6, at_most=8) == 16
    assert finder._reference is not None
    peak = {kind: float(r["sigmoid_0.tmp_0"].max()) for kind, r in zip(PROBES, finder._reference, strict=True)}
    assert peak["page"] > 0.5 and peak["normal"] < 0.01, peak  # only the page makes it detect


def test_an_empty_map_is_judged_against_the_rms_floor_not_against_zero():
    """A detector's map on an input with nothing in it is ~1e-5 everywhere: 10 % "relative" wobble there is
    1e-6 absolute and no detection changes; the same 10 % on a real map is an error."""
    from fleetpipe.accuracy import rel_l2

    rng = np.random.default_rng(0)
    empty = 1e-5 * rng.random((1, 1, 64, 64))
    real = rng.random((1, 1, 64, 64))
    assert rel_l2(empty * 1.1, empty) < 1e-3
    assert rel_l2(real * 1.1, real) == pytest.approx(0.1)
    assert rel_l2(np.full((1, 10), 0.02), np.zeros((1, 10))) > 0.01  # a map that appears from nothing


def test_check_names_a_tflite_or_missing_model_in_one_line(tmp_path, capsys):
    from fleetpipe.client_cli import check_outputs

    tfl = tmp_path / "m.tflite"
    tfl.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(32))
    x = [np.zeros((1, 3), np.float32)]
    assert check_outputs(str(tfl), x, [{}]) == 2
    assert check_outputs(str(tmp_path / "missing.onnx"), x, [{}]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "TFLite" in err[0] and "missing.onnx" in err[1]
