"""Calibration of the per-cut bit floor on the trained digits model with its real test labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fleetpipe.models import onnx_graph, zoo
from fleetpipe.models.calibrate import FULL_BITS, Calibration, _bisect, calibrate


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    model = zoo.build("digits")
    graph = onnx_graph.load_onnx(model, {"input": (1, 64)})
    x, y = zoo.digits_test_set()
    return model, graph, x, y


@pytest.fixture(scope="module")
def calib(digits):  # type: ignore[no-untyped-def]
    model, graph, x, y = digits
    return calibrate(model, graph, x, y, floor=0.005)


def test_floor_holds_and_lower_bits_do_not(digits, calib: Calibration) -> None:  # type: ignore[no-untyped-def]
    model, graph, x, y = digits
    assert calib.metric == "labels" and calib.n_samples == 360
    assert len(calib.min_bits) == len(graph.layers) - 1
    below_violates = False
    for cut, b in enumerate(calib.min_bits):
        assert b in (*calib.bits_candidates, FULL_BITS)
        loss = calib.loss(cut, b)
        assert loss is not None and loss <= 0.005  # the floor holds at the chosen width
        lower = [c for c in calib.bits_candidates if c < b]
        if not lower:
            continue  # nothing lower to try: the chosen width is the lowest candidate
        below = calib.loss(cut, lower[-1])
        if below is None:
            alone = calibrate(model, graph, x, y, bits_candidates=(lower[-1],), cuts=(cut,))
            below = alone.loss(cut, lower[-1])
        assert below is not None
        below_violates |= below > 0.005
    # lower bits than chosen violate the floor on at least one cut, or no lower candidate exists
    assert below_violates or all(b == min(calib.bits_candidates) for b in calib.min_bits)
    assert any(b < 8 for b in calib.min_bits)  # the calibration actually saves bytes on this model


def test_json_roundtrip_and_problem_array(calib: Calibration) -> None:
    doc = calib.to_json()
    assert json.loads(doc)["format"].startswith("fleetpipe-calibration")
    again = Calibration.from_json(doc)
    assert again == calib
    arr = calib.min_bits_array()
    assert arr.tolist() == [*calib.min_bits, 32]
    assert calib.model_id == Calibration.from_json(json.loads(doc)).model_id


def test_agreement_metric_and_cut_subset(digits) -> None:  # type: ignore[no-untyped-def]
    model, graph, x, _ = digits
    cal = calibrate(model, graph, x[:120], cuts=(1,), floor=0.02)
    assert cal.metric == "agreement"
    assert cal.min_bits[0] == FULL_BITS and cal.losses[0] == ()  # cut 0 not calibrated
    assert cal.loss(1, cal.min_bits[1]) <= 0.02


def test_nothing_fits_gives_full_precision(digits) -> None:  # type: ignore[no-untyped-def]
    model, graph, x, _ = digits
    cal = calibrate(model, graph, x[:60], bits_candidates=(2,), floor=0.0, metric="rel_l2")
    assert cal.min_bits == (FULL_BITS, FULL_BITS)


def test_bisection_finds_lowest_monotone() -> None:
    cands = [2, 3, 4, 5, 6, 7, 8]
    seen: list[int] = []
    for true_min in cands:
        seen.clear()

        def measure(b: int, t: int = true_min) -> float:
            seen.append(b)
            return 0.0 if b >= t else 1.0

        assert _bisect(cands, measure, 0.5) == true_min
        assert len(seen) <= 4  # log2(7) + the top check
    assert _bisect(cands, lambda b: 1.0, 0.5) == FULL_BITS


def test_bad_arguments(digits) -> None:  # type: ignore[no-untyped-def]
    model, graph, x, y = digits
    with pytest.raises(ValueError):
        calibrate(model, graph, x, y[:10])
    with pytest.raises(ValueError):
        calibrate(model, graph, x, y, cuts=(2,))
    with pytest.raises(ValueError):
        calibrate(model, graph, x, y, bits_candidates=(1,))
    with pytest.raises(ValueError):
        calibrate(model, graph, np.zeros((4, 63), np.float32))


def test_cli_writes_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import argparse

    from fleetpipe.models import calibrate_cli

    parser = argparse.ArgumentParser()
    calibrate_cli.register(parser.add_subparsers())
    out = tmp_path / "calib.json"
    args = parser.parse_args(["calibrate", "--model", "zoo:digits", "--samples", "120", "-o", str(out)])
    assert args.func(args) == 0
    cal = Calibration.from_json(out.read_text())
    assert cal.n_samples == 120 and len(cal.min_bits) == 2
