"""The synchronous client paces its producer: ``submit`` blocks while the window is full."""

from __future__ import annotations

import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from fleetpipe import topics, wire
from fleetpipe.client import FleetClient

pytestmark = pytest.mark.integration


def _retain_plan(port: int, fleet: str) -> None:
    """A plan whose stage 0 nobody serves: frames go out and no result ever comes back."""
    plan = wire.Plan(fleet=fleet, epoch=1, model_id="m", ts=time.time(), stages=(
        wire.PlanStage(index=0, first_layer=0, last_layer=0, nodes=("ghost",), input_names=("x",)),))
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    pub.publish(topics.plan(fleet), wire.encode(plan), qos=1, retain=True).wait_for_publish(5)
    pub.loop_stop()
    pub.disconnect()


def test_submit_blocks_when_the_window_is_full(mosquitto) -> None:
    _retain_plan(mosquitto.port, "win")
    x = np.zeros((1, 4), np.float32)
    with FleetClient(mosquitto.url, fleet="win", window=2, resend_s=60) as client:
        client.wait_plan(10)
        first, second = client.submit(x), client.submit(x)  # two slots: both go out at once
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="no window slot"):
            client.submit(x, timeout_s=0.5)
        assert time.monotonic() - start >= 0.45
        assert client.stats.submitted == 2
        assert not first.done() and not second.done()
