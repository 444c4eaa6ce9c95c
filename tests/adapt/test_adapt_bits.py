"""Online bit-width choice (COACH Eq. 11) and the link bandwidth estimator."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetpipe.node.adapt import (
    DEFAULT_CANDIDATES,
    AdaptiveBits,
    BandwidthEstimator,
    choose_bits,
    transfer_ms,
    wire_bytes,
)

NBYTES = 400_000  # float32 activation: 100k elements


def _choose(bw: float, te: float = 5.0, tc: float = 5.0, min_bits: int = 2, **kw: object) -> int:
    return choose_bits(compute_ms_prev=te, compute_ms_next=tc, nbytes_at_32=NBYTES, bandwidth_mbps=bw,
                       min_bits=min_bits, **kw)  # type: ignore[arg-type]


def test_fast_link_keeps_full_precision_slow_link_lowers() -> None:
    assert _choose(10_000.0) == 32  # 400 kB in 0.32 ms, under the 5 ms compute
    b = _choose(100.0)  # 32 bits would take 32 ms
    assert b < 32 and transfer_ms(wire_bytes(NBYTES, b), 100.0) <= 5.0
    higher = [c for c in DEFAULT_CANDIDATES if c > b]
    assert transfer_ms(wire_bytes(NBYTES, higher[0]), 100.0) > 5.0  # the highest that fits
    assert _choose(1.0) == 2  # nothing fits: the smallest transfer


def test_never_below_min_bits_and_respects_max() -> None:
    assert _choose(1.0, min_bits=6) == 6
    assert _choose(10_000.0, max_bits=8) == 8
    assert _choose(1.0, min_bits=32) == 32
    assert _choose(1.0, min_bits=9) == 16  # no candidate between 9 and 15


def test_target_bottleneck_relaxes_the_budget() -> None:
    assert _choose(100.0, target_ms=40.0) == 32  # the pipeline is slower elsewhere anyway
    assert _choose(100.0) < 32


def test_ties_choose_higher_bits() -> None:
    # every width fits: all costs are 0, the most precise wins
    assert _choose(1e6, candidates=(2, 4, 8)) == 8
    # callable byte counts: 4 and 8 bits cost the same bytes, 8 wins
    assert choose_bits(compute_ms_prev=1.0, compute_ms_next=1.0, nbytes_at_32=lambda b: 1000 if b <= 8 else 10**9,
                       bandwidth_mbps=1.0, min_bits=2, candidates=(4, 8, 32)) == 8


def test_link_down_still_returns_a_valid_width() -> None:
    assert _choose(0.0, min_bits=4) >= 4


@settings(max_examples=200, deadline=None)
@given(bw=st.floats(0.01, 1e5), te=st.floats(0.0, 100.0), tc=st.floats(0.0, 100.0),
       min_bits=st.sampled_from((2, 3, 4, 5, 6, 7, 8, 16, 32)), nbytes=st.integers(1, 10**8))
def test_property_eq11(bw: float, te: float, tc: float, min_bits: int, nbytes: int) -> None:
    b = choose_bits(compute_ms_prev=te, compute_ms_next=tc, nbytes_at_32=nbytes, bandwidth_mbps=bw,
                    min_bits=min_bits)
    assert b >= min_bits and b in DEFAULT_CANDIDATES
    budget = max(te, tc)
    t = transfer_ms(wire_bytes(nbytes, b), bw)
    allowed = [c for c in DEFAULT_CANDIDATES if c >= min_bits]
    if t <= budget:  # fits: no higher width fits
        assert all(transfer_ms(wire_bytes(nbytes, c), bw) > budget for c in allowed if c > b)
    else:  # does not fit: no allowed width has a shorter transfer
        assert all(transfer_ms(wire_bytes(nbytes, c), bw) >= t for c in allowed)
    # monotone in bandwidth: more bandwidth never lowers the width
    b2 = choose_bits(compute_ms_prev=te, compute_ms_next=tc, nbytes_at_32=nbytes, bandwidth_mbps=bw * 2,
                     min_bits=min_bits)
    assert b2 >= b


def test_estimator_tracks_and_ignores_tiny_messages() -> None:
    est = BandwidthEstimator(alpha=0.3, window=4, min_bytes=2048)
    assert est.mbps is None
    for _ in range(10):
        assert est.observe(100_000, 100_000 * 8 / 100e6)  # 100 Mbit/s
    assert est.mbps == pytest.approx(100.0)
    for _ in range(50):
        assert not est.observe(200, 0.002)  # latency-bound tiny messages: ignored
    assert est.mbps == pytest.approx(100.0)
    assert not est.observe(100_000, 0.0) and not est.observe(100_000, math.nan)
    for _ in range(15):
        est.observe(100_000, 100_000 * 8 / 20e6)
    assert est.mbps == pytest.approx(20.0, rel=0.05)
    est.reset()
    assert est.mbps is None and est.samples == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(2048, 10**7), st.floats(1e-5, 10.0)), min_size=1, max_size=30))
def test_property_estimate_within_observed_rates(obs: list[tuple[int, float]]) -> None:
    est = BandwidthEstimator(min_bytes=2048)
    for n, s in obs:
        est.observe(n, s)
    rates = [n * 8 / s / 1e6 for n, s in obs]
    assert est.mbps is not None
    assert min(rates) * (1 - 1e-9) <= est.mbps <= max(rates) * (1 + 1e-9)


def _run_profile(profile: list[tuple[float, int]], min_bits: int = 3) -> list[tuple[float, int]]:
    """Frames over an emulated link: each frame is sent at the chosen width and its transfer observed."""
    ad = AdaptiveBits(min_bits=min_bits, nbytes_at_32=NBYTES, up_after=5)
    trace = []
    for bw, frames in profile:
        for _ in range(frames):
            bits = ad.decide(15.0, 20.0).bits
            nbytes = int(wire_bytes(NBYTES, bits))
            ad.observe_transfer(nbytes, nbytes * 8 / (bw * 1e6))
            trace.append((bw, bits))
    return trace


def test_bits_react_to_bandwidth_drop_and_recover() -> None:
    trace = _run_profile([(1000.0, 30), (100.0, 30), (20.0, 30), (1000.0, 40)])
    phase = [trace[29][1], trace[59][1], trace[89][1], trace[-1][1]]
    assert phase[:3] == [32, 16, 4]  # 100 Mbit/s: 16 bits in 16 ms; 20 Mbit/s: 4 bits in 20 ms
    assert phase[3] == 32  # precision comes back
    assert min(b for _, b in trace) >= 3
    for bw, b in trace[-20:]:
        assert bw == 1000.0 and b == 32
    # once adapted, the transfer fits the 20 ms compute budget
    assert transfer_ms(wire_bytes(NBYTES, phase[2]), 20.0) <= 20.0
    # it reacts within a few frames of the drop (EWMA) and comes back only after the hysteresis delay
    drop = next(i for i in range(60, 90) if trace[i][1] < 16)
    assert drop - 60 <= 3
    back = next(i for i in range(90, len(trace)) if trace[i][1] == 32)
    assert 90 + 5 <= back <= 90 + 15


def test_bits_100_to_20_and_back() -> None:
    trace = _run_profile([(100.0, 30), (20.0, 30), (100.0, 40)])
    a, b, c = trace[29][1], trace[59][1], trace[-1][1]
    assert b < a and c == a


def test_hysteresis_does_not_flap() -> None:
    # bandwidth alternating around the switching point: few changes
    ad = AdaptiveBits(min_bits=2, nbytes_at_32=NBYTES, up_after=5)
    changes, last = 0, None
    for i in range(200):
        bits = ad.decide(5.0, 5.0).bits
        if last is not None and bits != last:
            changes += 1
        last = bits
        bw = 41.0 if i % 2 else 39.0  # 8 bits at 40 Mbit/s needs exactly 20 ms... budget 5 ms -> 2 bits region
        n = int(wire_bytes(NBYTES, bits))
        ad.observe_transfer(n, n * 8 / (bw * 1e6))
    assert changes <= 3


def test_floor_override_and_initial() -> None:
    ad = AdaptiveBits(min_bits=4, nbytes_at_32=NBYTES, initial_bits=8)
    d = ad.decide(1.0, 1.0)
    assert d.reason == "initial" and d.bits == 8
    ad.observe_transfer(NBYTES, NBYTES * 8 / 1e6)  # 1 Mbit/s
    assert ad.decide(1.0, 1.0).bits == 4
    assert ad.decide(1.0, 1.0, min_bits=2).bits == 2  # context relief lowers the floor for one frame
    assert ad.decide(1.0, 1.0).bits >= 4  # floor restored
