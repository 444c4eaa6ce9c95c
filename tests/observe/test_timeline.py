"""timeline_png draws a non-trivial PNG from synthetic hops with known bubbles; timeline CLI records results."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fleetpipe import topics, wire
from fleetpipe.cli import main
from fleetpipe.client import FrameResult
from fleetpipe.observe import timeline_png
from fleetpipe.observe._timeline import record_results
from fleetpipe.transport.mqtt import MqttBus
from tests.observe._synth import frames, plan

IDLE_RGB = np.array([0xF3, 0xC4, 0xC4])


def _idle_pixels(img: np.ndarray) -> int:
    return int((np.abs(img[..., :3].astype(int) - IDLE_RGB).sum(axis=-1) <= 6).sum())


def test_timeline_png_from_frame_results(tmp_path: Path) -> None:
    results = [FrameResult(frame_id=f"f{i}", outputs={}, epoch=3, latency_ms=40.0, hops=h, attempts=1)
               for i, h in enumerate(frames(n=5))]
    out = tmp_path / "t.png"
    stats = timeline_png(results, plan(), str(out))
    assert stats.stage_utilisation[0] == pytest.approx(50 / 115) and stats.stage_utilisation[1] == pytest.approx(
        100 / 115)
    assert stats.predicted_utilisation == {0: pytest.approx(0.5), 1: pytest.approx(1.0)}
    assert out.stat().st_size > 20_000
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width >= 1000 and im.height >= 400
        img = np.asarray(im.convert("RGB"))
    assert img.std() > 20  # not blank
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # frames in many colours, text, bars
    assert _idle_pixels(img) > 2000  # the bubbles are shaded


def test_more_bubbles_more_shading(tmp_path: Path) -> None:
    """Stage 0 idles far more when frames arrive slowly; the drawing shows it."""
    busy = timeline_png(frames(n=6, period_ms=20.0), plan(), str(tmp_path / "busy.png"))
    sparse = timeline_png(frames(n=6, period_ms=60.0), None, str(tmp_path / "sparse.png"))
    assert sparse.stage_utilisation[1] < busy.stage_utilisation[1]
    with Image.open(tmp_path / "busy.png") as a, Image.open(tmp_path / "sparse.png") as b:
        assert _idle_pixels(np.asarray(b.convert("RGB"))) > _idle_pixels(np.asarray(a.convert("RGB")))


def test_timeline_png_accepts_bare_hops(tmp_path: Path) -> None:
    hops = [h for f in frames(n=3) for h in f]
    stats = timeline_png(hops, None, str(tmp_path / "h.png"))
    assert stats.frames == 6 and (tmp_path / "h.png").stat().st_size > 10_000


@pytest.mark.integration
def test_record_results_over_mqtt(mosquitto, tmp_path: Path) -> None:
    fleet = "tl"

    async def run() -> tuple[list[wire.Result], wire.Plan | None]:
        async with MqttBus(mosquitto.url, client_id="tl-pub") as bus:
            await bus.publish(topics.plan(fleet), wire.encode(plan(fleet=fleet)), qos=1, retain=True)
            rec = asyncio.create_task(record_results(mosquitto.url, fleet, 1.5))
            await asyncio.sleep(0.5)
            for i, hops in enumerate(frames(n=4)):
                res = wire.Result(fleet=fleet, frame_id=f"fr{i}", client_id="cli", epoch=3, tensors=(),
                                  ts=hops[-1].send_ts, hops=hops)
                await bus.publish(topics.result(fleet, "cli"), wire.encode(res), qos=1)
            return await rec

    results, got_plan = asyncio.run(run())
    assert [r.frame_id for r in results] == ["fr0", "fr1", "fr2", "fr3"]
    assert got_plan is not None and got_plan.epoch == 3
    stats = timeline_png(results, got_plan, str(tmp_path / "rec.png"))
    assert stats.stage_transfer_ms[1] == pytest.approx(5.0)


@pytest.mark.integration
def test_timeline_cli_without_results_fails_cleanly(mosquitto, tmp_path: Path, capsys) -> None:
    rc = main(["timeline", "--broker", mosquitto.url, "--fleet", "empty", "--seconds", "0.3",
               "-o", str(tmp_path / "x.png")])
    assert rc == 1 and "no results" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_long_run_zooms_but_counts_everything(tmp_path: Path) -> None:
    stats = timeline_png(frames(n=200, c1_ms=25.0), plan(), str(tmp_path / "long.png"))
    assert stats.frames == 200 and stats.stage_utilisation[1] == pytest.approx(5.000 / 5.015)
    with Image.open(tmp_path / "long.png") as im:
        assert np.asarray(im.convert("RGB")).std() > 20
