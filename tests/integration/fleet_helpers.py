"""Helpers for integration tests: spawn planner and node processes against a test broker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


class Fleet:
    """Child processes of one test fleet; logs land in ``logdir``."""

    def __init__(self, url: str, fleet: str, logdir: Path) -> None:
        self.url = url
        self.fleet = fleet
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def spawn(self, name: str, args: Sequence[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.logdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "fleetpipe", "-v", *args], stdout=log,
                                    stderr=subprocess.STDOUT, env={**self.env, **(extra_env or {})},
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def planner(self, model: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.spawn("planner", ["planner", "--broker", self.url, "--fleet", self.fleet, "--model",
                                      str(model), "--interface", "127.0.0.1", *extra], env)

    def node(self, name: str, emulate: str = "host", env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.spawn(name, ["node", "--broker", self.url, "--fleet", self.fleet, "--name", name,
                                 "--emulate", emulate, "--cache-dir", str(self.logdir / "cache" / name),
                                 "--interface", "127.0.0.1"], env)

    def signal(self, name: str, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, sig)

    def wait_plan(self, client: object, timeout_s: float = 120) -> object:
        """The client's first plan; the test fails with the fleet's logs if none comes within ``timeout_s``."""
        import pytest

        try:
            return client.wait_plan(timeout_s)  # type: ignore[attr-defined]
        except TimeoutError:
            pytest.fail("no plan\n" + self.logs())

    def logs(self) -> str:
        out = []
        for f in sorted(self.logdir.glob("*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(out)

    def stop(self) -> None:
        for name in self.procs:
            self.signal(name, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name, proc in self.procs.items():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.signal(name, signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def fleet(url: str, name: str, logdir: Path) -> Iterator[Fleet]:
    f = Fleet(url, name, logdir)
    try:
        yield f
    finally:
        f.stop()


def tiny_resnet18(tmp_path: Path, width: float = 0.25, resolution: int = 32) -> tuple[Path, tuple[int, ...]]:
    """A small zoo ResNet-18 (10 classes) saved under ``tmp_path``; returns its path and input shape."""
    import onnx

    from fleetpipe.models import zoo

    kw = {"width": width, "resolution": resolution, "num_classes": 10}
    path = tmp_path / "resnet18.onnx"
    onnx.save(zoo.build("resnet18", **kw), path)
    return path, tuple(zoo.input_shape("resnet18", **kw))


def pinned_profile(model: Path, dest: Path, total_ms: float | None = None) -> Path:
    """A planner ``--profile`` file for ``model``: its per-layer host times measured here, before any node
    starts (a planner profiling beside starting nodes on 2 cores sees preempted layers), and with
    ``total_ms`` scaled to that whole-model time, so a test whose plan hinges on compute against message
    costs plans the same on a fast host as on a slow one (a split that gains 20 % here gains 5 % on a host
    twice as fast, under the planner's 10 % bar)."""
    import json

    from fleetpipe.planner.loop import load_model_info

    load_model_info(str(model), profile=str(dest))
    doc = json.loads(dest.read_text())
    if total_ms is not None:
        host = [float(t) for t in doc["host_ms"]]
        doc["host_ms"] = [t * total_ms / sum(host) for t in host]
        dest.write_text(json.dumps(doc))
    return dest
