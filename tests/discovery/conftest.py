"""Discovery fixtures: announcer subprocesses, network namespaces joined by a veth pair, a private avahi.

No multicast leaves the test host: everything binds to 127.0.0.1 or to addresses inside namespaces
created here (169.254.77.0/24 exists only on the veth pair between them).
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI") == "true"
LOOPBACK = ["127.0.0.1"]


@pytest.fixture
def fleet() -> str:
    """A fleet name no other test (or engineer's test run on this host) uses."""
    return f"t-{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class Announced:
    """A running ``fleetpipe broker announce`` process."""

    proc: subprocess.Popen[bytes]
    started_at: float
    line: str


@contextmanager
def announce_broker(url: str, fleet: str, interface: str = "127.0.0.1", netns: str | None = None,
                    timeout_s: float = 20.0) -> Iterator[Announced]:
    """Run ``python -m fleetpipe broker announce`` (optionally in ``netns``) until the block ends."""
    cmd = [sys.executable, "-m", "fleetpipe", "broker", "announce", "--url", url, "--fleet", fleet,
           "--interface", interface]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = _read_line(proc, timeout_s)
        if not line.startswith("announcing"):
            proc.kill()
            _, err = proc.communicate(timeout=5)
            pytest.fail(f"announce did not start: {line!r} {err.decode(errors='replace')}")
        yield Announced(proc, started, line)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert rc == 0, f"announce exited with {rc}"


def _read_line(proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout_s
    while b"\n" not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    return buf.decode(errors="replace").strip()


@dataclass(frozen=True, slots=True)
class NetnsPair:
    """Two namespaces ``a`` and ``b`` joined by a veth pair ``addr_a`` <-> ``addr_b``."""

    a: str
    b: str
    addr_a: str
    addr_b: str
    veth_a: str
    veth_b: str

    def run(self, ns: str, *cmd: str, timeout: float = 30.0, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run a command inside namespace ``ns``."""
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                              timeout=timeout, env=env)


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    """Create two network namespaces joined by a veth pair; skip with the reason if not permitted."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 `ip` is not installed; cannot create network namespaces")
    tag = f"{os.getpid() % 100000}{secrets.token_hex(1)}"
    pair = NetnsPair(f"fpt{tag}a", f"fpt{tag}b", "169.254.77.1", "169.254.77.2", f"fpv{tag}a", f"fpv{tag}b")
    probe = subprocess.run(["ip", "netns", "add", pair.a], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create network namespaces here (`ip netns add` failed: {probe.stderr.strip()})")
    veth_a, veth_b = pair.veth_a, pair.veth_b
    try:
        for cmd in (
            ["ip", "netns", "add", pair.b],
            ["ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b],
            ["ip", "link", "set", veth_a, "netns", pair.a],
            ["ip", "link", "set", veth_b, "netns", pair.b],
            ["ip", "-n", pair.a, "addr", "add", f"{pair.addr_a}/24", "dev", veth_a],
            ["ip", "-n", pair.b, "addr", "add", f"{pair.addr_b}/24", "dev", veth_b],
            ["ip", "-n", pair.a, "link", "set", "lo", "up"],
            ["ip", "-n", pair.b, "link", "set", "lo", "up"],
            ["ip", "-n", pair.a, "link", "set", veth_a, "up"],
            ["ip", "-n", pair.b, "link", "set", veth_b, "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        yield pair
    finally:
        for ns in (pair.a, pair.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", veth_a], capture_output=True)  # only if left in the host


_BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/>
  </policy>
</busconfig>
"""

_AVAHI_CONF = """[server]
use-ipv4=yes
use-ipv6=no
allow-interfaces={interface}
enable-dbus=yes
[publish]
disable-publishing=yes
"""


@dataclass(frozen=True, slots=True)
class Avahi:
    """A private avahi-daemon in a namespace, reachable over a private D-Bus system bus."""

    netns: str
    env: dict[str, str]


@pytest.fixture
def avahi(netns_pair: NetnsPair) -> Iterator[Avahi]:
    """avahi-daemon + a private dbus-daemon inside ``netns_pair.b``; skip with the reason if impossible."""
    missing = [b for b in ("avahi-daemon", "avahi-browse", "dbus-daemon") if shutil.which(b) is None]
    if missing:
        why = f"{', '.join(missing)} not installed (Debian: apt-get install avahi-utils avahi-daemon)"
        if IN_CI:
            pytest.fail(f"{why}; the test command's set-up installs them under CI")
        pytest.skip(why)
    workdir = Path(tempfile.mkdtemp(prefix="fpavahi-"))  # short path: unix socket names are <= 107 bytes
    bus = workdir / "bus"
    (workdir / "bus.conf").write_text(_BUS_CONF.format(socket=bus))
    (workdir / "avahi.conf").write_text(_AVAHI_CONF.format(interface=netns_pair.veth_b))
    procs: list[subprocess.Popen[bytes]] = []
    log = workdir / "avahi.log"
    try:
        dbus = subprocess.Popen(["dbus-daemon", "--config-file", str(workdir / "bus.conf"), "--nofork"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(dbus)
        if not _wait_for(lambda: bus.exists(), 5.0):
            pytest.skip("private dbus-daemon did not start")
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={bus}"}
        # tmpfs over /run in the namespace's private mount table: avahi's pid file never touches the host's.
        script = ("mount -t tmpfs tmpfs /run && mkdir -p /run/avahi-daemon && exec avahi-daemon "
                  f"-f {workdir / 'avahi.conf'} --no-drop-root --no-chroot --no-rlimits")
        with log.open("wb") as out:
            daemon = subprocess.Popen(["ip", "netns", "exec", netns_pair.b, "sh", "-c", script],
                                      stdout=out, stderr=subprocess.STDOUT, env=env)
        procs.append(daemon)
        if not _wait_for(lambda: "Server startup complete" in log.read_text(errors="replace")
                         or daemon.poll() is not None, 10.0) or daemon.poll() is not None:
            reason = log.read_text(errors="replace").strip().splitlines()[-3:]
            pytest.skip(f"avahi-daemon cannot run here: {reason}")
        yield Avahi(netns_pair.b, env)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for(predicate: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False
