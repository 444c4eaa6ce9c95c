"""Device emulation: class parsing, compute stretch, token-bucket pacing (fake clock and real time)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from fleetpipe.errors import ConfigError
from fleetpipe.node.emulate import CLASSES, DeviceClass, TokenBucket, parse_emulate, stretch


def test_classes_are_sane() -> None:
    assert {"rpi3", "rpi4", "jetson-nano", "x86", "host"} <= set(CLASSES)
    assert (
        CLASSES["rpi3"].compute_factor
        > CLASSES["rpi4"].compute_factor
        > CLASSES["jetson-nano"].compute_factor
    )
    assert CLASSES["x86"].compute_factor == 1.0
    for name, device in CLASSES.items():
        assert device.name == name


@pytest.mark.parametrize(
    ("spec", "name", "factor", "bw"),
    [
        ("rpi4", "rpi4", 5.0, 940.0),
        ("3.5", "x3.5", 3.5, None),
        ("rpi4:bw=50", "rpi4", 5.0, 50.0),
        (" 2:bw=10.5 ", "x2", 2.0, 10.5),
        ("jetson-nano", "jetson-nano", 3.0, 940.0),
    ],
)
def test_parse_emulate(spec: str, name: str, factor: float, bw: float | None) -> None:
    device = parse_emulate(spec)
    assert (device.name, device.compute_factor, device.bandwidth_mbps) == (name, factor, bw)


def test_parse_emulate_overrides_mem_and_cores() -> None:
    device = parse_emulate("rpi3:mem=512000000,cores=2")
    assert (device.mem_bytes, device.cores, device.bandwidth_mbps) == (512_000_000, 2, 94.0)


@pytest.mark.parametrize(
    "spec", ["", "pi9", "0.5", "nan", "inf", "rpi4:bw", "rpi4:bw=-1", "rpi4:speed=2", "rpi4:bw=x"]
)
def test_parse_emulate_rejects(spec: str) -> None:
    with pytest.raises(ConfigError, match="--emulate"):
        parse_emulate(spec)


def test_device_class_validation() -> None:
    with pytest.raises(ValueError):
        DeviceClass("slow", 0.9)
    with pytest.raises(ValueError):
        DeviceClass("x", 2.0, bandwidth_mbps=0)


def test_stretch() -> None:
    assert stretch(10.0, 1.0) == 0.0
    assert stretch(10.0, 3.0) == pytest.approx(20.0)
    assert stretch(0.0, 6.0) == 0.0


class FakeClock:
    """Manually advanced monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_arithmetic_with_fake_clock() -> None:
    clock = FakeClock()
    bucket = TokenBucket(8.0, burst_bytes=1000, clock=clock)  # 8 Mbit/s = 1e6 bytes/s
    assert bucket.rate_mbps == pytest.approx(8.0)
    assert bucket.delay_for(1000) == 0.0
    assert bucket.reserve(1000) == 0.0
    assert bucket.delay_for(500) == pytest.approx(500e-6)
    assert bucket.delay_for(500) == pytest.approx(500e-6)  # delay_for does not reserve
    assert bucket.reserve(2000) == pytest.approx(2e-3)  # larger than the burst: allowed, in debt
    assert bucket.reserve(1000) == pytest.approx(3e-3)  # queued behind the debt
    clock.now += 3e-3
    assert bucket.delay_for(0) == 0.0
    clock.now += 10.0
    assert bucket.delay_for(1000) == 0.0  # refill is capped at the burst
    assert bucket.delay_for(1001) == pytest.approx(1e-6)
    bucket.set_rate(16.0)
    assert bucket.delay_for(3000) == pytest.approx(2000 / 2e6)
    with pytest.raises(ValueError):
        bucket.set_rate(0)
    with pytest.raises(ValueError):
        bucket.reserve(-1)


def test_token_bucket_unlimited_rate() -> None:
    bucket = TokenBucket(math.inf, burst_bytes=0)
    assert bucket.reserve(10**9) == 0.0
    assert bucket.delay_for(10**9) == 0.0


async def _send(bucket: TokenBucket, seconds: float, chunk: int) -> float:
    """Send chunks for ``seconds`` after one warm-up chunk; return the achieved rate in Mbit/s."""
    await bucket.consume(chunk)  # drains whatever burst is left, so only the rate is measured
    start = time.perf_counter()
    sent = 0
    while time.perf_counter() - start < seconds:
        await bucket.consume(chunk)
        sent += chunk
    return sent * 8 / 1e6 / (time.perf_counter() - start)


def test_token_bucket_real_rate_within_ten_percent_and_set_rate() -> None:
    async def main() -> tuple[float, float]:
        # A burst of one chunk lets the bucket absorb sleep overshoot on a busy machine.
        bucket = TokenBucket(4.0, burst_bytes=5_000)  # 500 kB/s
        first = await _send(bucket, 0.3, 5_000)
        bucket.set_rate(1.6)  # 200 kB/s
        second = await _send(bucket, 0.3, 5_000)
        return first, second

    first, second = asyncio.run(main())
    assert first == pytest.approx(4.0, rel=0.10)
    assert second == pytest.approx(1.6, rel=0.10)
