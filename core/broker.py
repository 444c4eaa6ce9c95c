"""Start and stop a private mosquitto (demo, benches, tests): loopback, free port, shipped config."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from fleetpipe.deploy import broker_config
from fleetpipe.errors import BrokerUnavailable

__all__ = ["LocalBroker", "find_mosquitto", "free_port"]

_SEARCH = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None when it is not installed."""
    return shutil.which("mosquitto") or next((p for p in _SEARCH if Path(p).exists()), None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalBroker:
    """A mosquitto process bound to 127.0.0.1 with a config rendered from ``broker_config``.

    Use as a context manager; ``url`` is ``mqtt://127.0.0.1:<port>``.
    """

    def __init__(self, *, port: int | None = None, conf: str = "lab.conf", workdir: str | Path | None = None,
                 **values: object) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.conf_name = conf
        self.values = values
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.workdir = Path(workdir) if workdir else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> LocalBroker:
        """Start mosquitto and wait until it accepts TCP connections."""
        binary = find_mosquitto()
        if binary is None:
            raise BrokerUnavailable(
                "mosquitto is not installed (Debian: apt-get install mosquitto; scripts/setup does it)")
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fleetpipe-broker-")
            self.workdir = Path(self._tmp.name)
        conf = self.workdir / f"mosquitto-{self.port}.conf"
        conf.write_text(broker_config.render(self.conf_name, port=self.port, bind=self.host,
                                             dir=self.workdir, **self.values))
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise BrokerUnavailable(f"mosquitto exited at start (port {self.port}): {err.strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerUnavailable(f"mosquitto did not listen on {self.port} within {timeout_s} s")

    def stop(self) -> None:
        """Terminate mosquitto (kill if it does not stop within 5 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.workdir = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
