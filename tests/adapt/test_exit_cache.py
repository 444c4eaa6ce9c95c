"""Exit caches: calibrated per cut, carried in the assignment (wire), rebuilt on the node."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fleetpipe import wire
from fleetpipe.models import zoo
from fleetpipe.models.calibrate import Calibration, calibrate
from fleetpipe.models.onnx_graph import load_onnx
from fleetpipe.node.daemon import _exit_cache


def test_exit_cache_round_trips_in_the_assignment_and_is_validated() -> None:
    e = wire.ExitCache(threshold=0.5, centres=((0.1, 0.2), (0.3, 0.4)), counts=(3, 4))
    a = wire.StageAssign("lab", "n", 1, 0, 2, 0, 1, "m", "", 0, 0.0, exit_cache=e)
    assert wire.decode(wire.encode(a)) == a
    for bad in ({"threshold": 0.0}, {"centres": ((0.1,),)}, {"counts": (1,)}, {"centres": ((0.1, 0.2), (0.3,))},
                {"counts": (1, -1)}):
        with pytest.raises(ValueError):
            wire.ExitCache(**{"threshold": 0.5, "centres": ((0.1, 0.2), (0.3, 0.4)), "counts": (3, 4), **bad})


def test_calibration_finds_exit_caches_for_the_digits_model() -> None:
    proto = zoo.build("digits")
    x, y = zoo.digits_test_set()
    graph = load_onnx(proto, input_shapes={proto.graph.input[0].name: (1, 64)})
    cal = calibrate(proto, graph, x[:180], y[:180])
    assert cal.exits
    again = Calibration.from_json(cal.to_json())
    assert again.exits.keys() == cal.exits.keys()
    for cut, doc in again.exits.items():
        assert math.isfinite(doc["threshold"]) and doc["threshold"] > 0
        assert len(doc["centres"]) == 10 == len(doc["counts"]) and sum(doc["counts"]) == 180, cut
        cache = _exit_cache(wire.ExitCache(threshold=doc["threshold"], centres=tuple(map(tuple, doc["centres"])),
                                           counts=tuple(doc["counts"])))
        assert cache.threshold == doc["threshold"]
        np.testing.assert_allclose(cache.centres, np.asarray(doc["centres"]))
    # without labels there is no label set to exit with
    assert not calibrate(proto, graph, x[:60]).exits
