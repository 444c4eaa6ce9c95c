"""Context-aware cache (COACH Eq. 7/9): early exit on the trained digits model, correlated vs shuffled streams."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from fleetpipe import codec
from fleetpipe.models import onnx_graph, slicing, zoo
from fleetpipe.node.context import SemanticCache, separability

FLOOR = 0.005


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    model = zoo.build("digits")
    graph = onnx_graph.load_onnx(model, {"input": (1, 64)})
    x, y = zoo.digits_test_set()
    pred = slicing.run_model(slicing.make_session(model), {"input": x})["logits"].argmax(axis=1)
    acts = {}
    for cut in (0, 1):
        sess = slicing.make_session(slicing.slice_model(model, graph, 0, cut))
        name = graph.crossing(cut)[0]
        acts[cut] = np.concatenate([slicing.run_model(sess, {"input": x[i : i + 1]})[name] for i in range(len(x))])
    return model, graph, x, y, pred, acts


def _fit(feats: np.ndarray, y: np.ndarray, pred: np.ndarray, max_count: int | None = 8) -> SemanticCache:
    cache = SemanticCache(10, feats.shape[1], max_count=max_count)
    cache.warm(feats, y)
    cache.calibrate_threshold(feats, y, pred, FLOOR)
    return cache


def _held_out(cache: SemanticCache, feats: np.ndarray, y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    exits = correct = 0
    for f, truth, p in zip(feats, y, pred, strict=True):
        ex, label, _ = cache.decide(f)
        exits += ex
        correct += (label if ex else p) == truth
    return exits / len(y), float(np.mean(pred == y)) - correct / len(y)


def _stream(cache: SemanticCache, feats: np.ndarray, y: np.ndarray, pred: np.ndarray,
            order: np.ndarray) -> tuple[float, float]:
    """Online: exit or run the full model, then fold the frame into the centre of the label returned."""
    c = copy.deepcopy(cache)
    exits = correct = 0
    for i in order:
        ex, label, _ = c.decide(feats[i])
        out = label if ex else int(pred[i])
        exits += ex
        correct += out == y[i]
        c.update(feats[i], out)
    return exits / len(order), float(np.mean(pred[order] == y[order])) - correct / len(order)


def test_eq9_separability() -> None:
    t = np.array([0.9, 0.3, 0.1])
    assert separability(t) == pytest.approx(np.linalg.norm(t) * 0.6 * 3.0)
    assert separability(np.array([[0.5, 0.5]]))[0] == 0.0


def test_feature_pools_and_running_mean() -> None:
    assert SemanticCache.feature(np.ones((2, 3, 4, 4))).shape == (2, 3)
    assert SemanticCache.feature(np.ones((2, 5, 7))).shape == (2, 7)
    c = SemanticCache(2, 2)
    c.update(np.array([1.0, 0.0]), 0)
    c.update(np.array([3.0, 0.0]), 0)
    assert c.centres[0].tolist() == [2.0, 0.0]  # Eq. 7
    assert c.decide(np.array([1.0, 0.0])) == (False, None, 0.0)  # one centre only: never exits
    c.update(np.array([0.0, 1.0]), 1)
    c.threshold = 1.0
    ex, label, s = c.decide(np.array([1.0, 0.05]))
    assert ex and label == 0 and s > 1.0
    capped = SemanticCache(2, 1, max_count=1)
    capped.warm(np.array([[0.0]] * 9), [0] * 9)
    capped.update(np.array([10.0]), 0)
    assert capped.centres[0, 0] == pytest.approx(5.0)  # count capped: follows the context


@pytest.mark.parametrize("cut", [1, 0])
def test_early_exit_holds_floor_on_held_out_half(digits, cut: int) -> None:  # type: ignore[no-untyped-def]
    _, _, _, y, pred, acts = digits
    feats = SemanticCache.feature(acts[cut])
    n = len(y) // 2
    cache = _fit(feats[:n], y[:n], pred[:n])
    assert math.isfinite(cache.threshold)
    ratio, loss = _held_out(cache, feats[n:], y[n:], pred[n:])
    print(f"cut {cut}: S_ext={cache.threshold:.4f} held-out early-exit ratio {ratio:.3f}, accuracy loss {loss:+.4f}")
    assert ratio > 0.3
    if cut == 1:
        assert loss <= FLOOR
    else:  # after the first layer the nearest-centre classifier is weaker: at most one frame of 180 over
        assert loss <= FLOOR + 1 / (len(y) - n) + 1e-9


def test_correlated_stream_exits_more_than_shuffled(digits) -> None:  # type: ignore[no-untyped-def]
    _, _, _, y, pred, acts = digits
    feats = SemanticCache.feature(acts[1])
    n = len(y) // 2
    cache = _fit(feats[:n], y[:n], pred[:n], max_count=8)
    rest = np.arange(n, len(y))
    correlated = rest[np.argsort(y[rest], kind="stable")]  # the same class repeated in runs
    shuffled = np.random.default_rng(0).permutation(rest)
    r_corr, l_corr = _stream(cache, feats, y, pred, correlated)
    r_shuf, l_shuf = _stream(cache, feats, y, pred, shuffled)
    print(f"early-exit ratio correlated {r_corr:.3f} (loss {l_corr:+.4f}) vs shuffled {r_shuf:.3f} "
          f"(loss {l_shuf:+.4f})")
    assert r_corr >= r_shuf
    assert max(l_corr, l_shuf) <= FLOOR + 1 / len(rest) + 1e-9


def test_bits_relief_keeps_accuracy(digits) -> None:  # type: ignore[no-untyped-def]
    """Frames relieved below the calibrated 3 bits at cut 0 still keep the accuracy floor."""
    model, graph, _x, y, pred, acts = digits
    feats = SemanticCache.feature(acts[0])
    n = len(y) // 2
    cache = _fit(feats[:n], y[:n], pred[:n])
    suffix = slicing.make_session(slicing.slice_model(model, graph, 1, 2))
    correct = {"calibrated": 0, "relieved": 0}
    relieved = 0
    for i in range(n, len(y)):
        _, _, s = cache.decide(feats[i])
        bits = cache.relieved_min_bits(3, s)
        relieved += bits < 3
        for key, b in (("calibrated", 3), ("relieved", bits)):
            a = codec.decode_tensor(codec.encode_tensor(acts[0][i : i + 1], b))
            correct[key] += int(slicing.run_model(suffix, {"fc0/Relu": a})["logits"].argmax()) == y[i]
    extra = (correct["calibrated"] - correct["relieved"]) / (len(y) - n)
    print(f"bit relief: {relieved} of {len(y) - n} frames sent below 3 bits, extra accuracy loss {extra:+.4f}")
    assert relieved > 0 and extra <= FLOOR
    assert cache.relieved_min_bits(16, 1e9) == 16 and cache.bits_relief(0.0) == 0


def test_threshold_never_exits_when_cache_is_useless() -> None:
    rng = np.random.default_rng(1)
    feats = rng.random((100, 8))
    labels = rng.integers(0, 4, 100)
    c = SemanticCache(4, 8)
    c.warm(feats, labels)
    th = c.calibrate_threshold(feats, labels, None, 0.0)
    ex = sum(c.decide(f)[0] for f in feats)
    assert ex == 0 or th > 0
    # every exit on the calibration set (leave-one-out) is right when the floor is 0
    t = c._leave_one_out(feats, labels, c.similarities(feats))
    s = np.asarray(separability(t))
    assert np.all(t.argmax(axis=1)[s > th] == labels[s > th])
