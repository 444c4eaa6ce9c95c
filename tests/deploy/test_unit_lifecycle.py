"""The daemons as systemd starts them (issue 20 items 1, 4, 5).

Each test writes the unit and config with ``install-service --prefix`` and runs the unit's exact ExecStart (parsed
from the rendered unit file; only /etc/fleetpipe paths are mapped into the throw-away root), with NOTIFY_SOCKET set
to a datagram socket as systemd does. Nothing passes -v: what the tests read is what the journal would show.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetpipe.cli import main
from tests.conftest import unused_tcp_port
from tests.integration.fleet_helpers import fleet, tiny_resnet18

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

STOP_BOUND_S = 5.0


def unit_argv(root: Path, unit: str) -> list[str]:
    """The unit's ExecStart as argv, its /etc/fleetpipe paths moved under ``root``."""
    text = (root / "etc/systemd/system" / unit).read_text()
    line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(line.removeprefix("ExecStart="))
    return [str(root) + a if a.startswith("/etc/fleetpipe/") else a for a in argv]


class Daemon:
    """A unit's process with its log (stdout+stderr, as the journal gets them) and its sd_notify messages."""

    def __init__(self, argv: list[str], tmp: Path, env: dict[str, str]) -> None:
        self.log_path = tmp / f"{Path(argv[-1]).stem}.log"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = tmp / "notify"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.notes: list[str] = []
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": str(path),
                                              **env})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def notified(self) -> list[str]:
        with contextlib.suppress(BlockingIOError):
            while True:
                self.notes.append(self.sock.recv(4096).decode())
        return self.notes

    def wait_for(self, what: str, timeout_s: float, *, in_notify: bool = False) -> float:
        """Seconds until ``what`` appears in the log (or a notify message); fails with the log if it does not."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            hay = "\n".join(self.notified()) if in_notify else self.log()
            if what in hay:
                return time.monotonic() - t0
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"{what!r} not seen within {timeout_s} s (rc {self.proc.poll()}):\n{self.log()}\n"
                    f"notify: {self.notified()}")

    def terminate(self) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds to exit)."""
        t0 = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(STOP_BOUND_S + 5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"ignored SIGTERM for {STOP_BOUND_S + 5} s:\n{self.log()}")
        return rc, time.monotonic() - t0

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.sock.close()


@contextlib.contextmanager
def daemon(argv: list[str], tmp: Path, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    d = Daemon(argv, tmp, {"FLEETPIPE_INTERFACES": "127.0.0.1", **(env or {})})
    try:
        yield d
    finally:
        d.close()


def _install(root: Path, *argv: str) -> None:
    assert main(["install-service", "--prefix", str(root), *argv]) == 0


def test_node_unit_waits_for_an_unreachable_broker_loudly_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = unused_tcp_port()  # nothing listens there
    root = tmp_path / "root"
    _install(root, "--name", "pi-unit", "--fleet", "lab", "--broker", f"mqtt://127.0.0.1:{port}")
    argv = unit_argv(root, "fleetpipe-node.service")
    assert "--name" not in argv and argv[1:3] == ["node", "--config"]
    with daemon(argv, tmp_path, {"FLEETPIPE_CACHE_DIR": str(tmp_path / "cache")}) as d:
        d.wait_for(f"WARNING fleetpipe.transport.mqtt: fp-lab-pi-unit: MQTT broker at mqtt://127.0.0.1:{port} "
                   "not reachable (attempt 1); next retry in", 20)
        d.wait_for(f"STATUS=waiting for the MQTT broker at mqtt://127.0.0.1:{port}", 2, in_notify=True)
        rc, took = d.terminate()
        log = d.log()
    assert rc == 0 and took < STOP_BOUND_S, (rc, took, log)
    assert "Traceback" not in log
    assert "node pi-unit: stopped while waiting for the broker" in log  # the config's name, not the host's
    assert not any("READY=1" in n for n in d.notes)


def test_planner_unit_stops_on_sigterm_while_loading_and_while_connecting(tmp_path: Path) -> None:
    port = unused_tcp_port()
    model, _ = tiny_resnet18(tmp_path)
    root = tmp_path / "root"
    # Loading: the zoo's ResNet-50 is built and profiled for seconds; SIGTERM lands in the middle.
    _install(root, "--role", "planner", "--fleet", "lab", "--broker", f"mqtt://127.0.0.1:{port}", "--model",
             "zoo:resnet50")
    argv = unit_argv(root, "fleetpipe-planner.service")
    with daemon(argv, tmp_path) as d:
        d.wait_for("STATUS=loading model zoo:resnet50", 20, in_notify=True)
        rc, took = d.terminate()
        log = d.log()
    assert rc == 0 and took < STOP_BOUND_S, (rc, took, log)
    assert "planner: model " not in log, "the load finished before SIGTERM: not a loading test"
    assert "Traceback" not in log and "planner: stopped before it was connected" in log

    # Connecting: a small model loads, then the broker is not there.
    _install(root, "--role", "planner", "--fleet", "lab", "--broker", f"mqtt://127.0.0.1:{port}", "--model",
             str(model), "--force")
    with daemon(argv, tmp_path) as d:
        d.wait_for(f"MQTT broker at mqtt://127.0.0.1:{port} not reachable (attempt 1); next retry in", 30)
        assert "WARNING" in d.log()
        d.wait_for(f"STATUS=waiting for the MQTT broker at mqtt://127.0.0.1:{port}", 2, in_notify=True)
        rc, took = d.terminate()
        log = d.log()
    assert rc == 0 and took < STOP_BOUND_S, (rc, took, log)
    assert "Traceback" not in log


def test_node_unit_logs_its_lifecycle_at_the_default_level(mosquitto, tmp_path: Path) -> None:
    """A healthy node's journal: connected, assigned, loaded, draining, stopped; one line each."""
    model, _ = tiny_resnet18(tmp_path)
    root = tmp_path / "root"
    _install(root, "--name", "pi-life", "--fleet", "life", "--broker", mosquitto.url)
    with fleet(mosquitto.url, "life", tmp_path) as f:
        f.planner(model, "--expect-nodes", "1", "--bits", "32")
        with daemon(unit_argv(root, "fleetpipe-node.service"), tmp_path,
                    {"FLEETPIPE_CACHE_DIR": str(tmp_path / "cache")}) as d:
            d.wait_for("node pi-life: epoch 1 stage 0 layers", 90)
            d.wait_for("STATUS=serving epoch 1 stage 0", 5, in_notify=True)
            rc, _took = d.terminate()
            log = d.log()
    assert rc == 0, log
    lines = [line for line in log.splitlines() if "fleetpipe.node: node pi-life:" in line]
    wanted = [f"connected to {mosquitto.url} (fleet life)", "assigned epoch 1 stage 0/1 layers", "loaded (onnx",
              "draining", "stopped (exit code 0)"]
    for what in wanted:
        hits = [line for line in lines if what in line]
        assert len(hits) == 1 and " INFO " in hits[0], (what, log)
    assert [next(i for i, line in enumerate(lines) if w in line) for w in wanted] == sorted(
        next(i for i, line in enumerate(lines) if w in line) for w in wanted)
    assert "Traceback" not in log
