"""Shared fixtures: a real mosquitto on 127.0.0.1 (ephemeral port), quick timing, thread-leak check."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetpipe import timing
from fleetpipe.deploy import broker_config

IN_CI = os.environ.get("CI") == "true"


def unused_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str | None:
    """Path of the mosquitto binary, or None."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


class Broker:
    """A running private mosquitto."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, conf: Path) -> None:
        self.proc = proc
        self.port = port
        self.host = "127.0.0.1"
        self.url = f"mqtt://127.0.0.1:{port}"
        self.conf = conf

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def start_broker(tmp: Path, port: int | None = None, conf_name: str = "lab.conf") -> Broker:
    """Start mosquitto from a shipped config on 127.0.0.1 and wait until it accepts connections."""
    binary = mosquitto_binary()
    if binary is None:
        if IN_CI:
            pytest.fail("mosquitto is not installed; under CI this is a failure (scripts/setup installs it)")
        pytest.skip("mosquitto binary not found")
    port = port or unused_tcp_port()
    conf = tmp / f"mosquitto-{port}.conf"
    conf.write_text(broker_config.render(conf_name, port=port, bind="127.0.0.1"))
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"mosquitto exited at start: {err}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return Broker(proc, port, conf)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("mosquitto did not start listening within 10 s")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A fresh mosquitto for one test."""
    broker = start_broker(tmp_path)
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def shared_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One mosquitto for tests that only need a broker (use unique fleet names)."""
    broker = start_broker(tmp_path_factory.mktemp("broker"))
    yield broker
    broker.stop()


@pytest.fixture
def quick_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorten heartbeat/lease/retry constants for fast tests."""
    monkeypatch.setattr(timing, "HEALTH_INTERVAL_S", 0.2)
    monkeypatch.setattr(timing, "LEASE_S", 0.8)
    monkeypatch.setattr(timing, "RECONNECT_MIN_S", 0.05)
    monkeypatch.setattr(timing, "RECONNECT_MAX_S", 0.5)
    monkeypatch.setattr(timing, "REPLAN_DEBOUNCE_S", 0.1)
    monkeypatch.setattr(timing, "FRAME_RESEND_S", 1.0)


@pytest.fixture(autouse=True)
def verify_threads_ended() -> Iterator[None]:
    """Fail a test that leaves non-daemon threads running."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, f"threads leaked: {[t.name for t in leaked]}"
