"""Two network namespaces joined by a veth pair find each other; a real avahi-browse sees the advert."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetpipe.deploy import broker_config
from tests.conftest import IN_CI, mosquitto_binary

from .conftest import Avahi, NetnsPair, announce_broker

pytestmark = pytest.mark.integration


@pytest.fixture
def netns_mosquitto(netns_pair: NetnsPair, tmp_path: Path) -> Iterator[str]:
    """A mosquitto inside namespace ``a`` bound to its veth address; yields its URL."""
    binary = mosquitto_binary()
    if binary is None:
        if IN_CI:
            pytest.fail("mosquitto is not installed; under CI this is a failure")
        pytest.skip("mosquitto binary not found")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(broker_config.render("lab.conf", port=1883, bind=netns_pair.addr_a))
    proc = subprocess.Popen(["ip", "netns", "exec", netns_pair.a, binary, "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        probe = f"import socket; socket.create_connection(('{netns_pair.addr_a}', 1883), timeout=0.2)"
        deadline = time.monotonic() + 10
        while netns_pair.run(netns_pair.b, sys.executable, "-c", probe).returncode != 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("mosquitto in the namespace did not start")
            time.sleep(0.1)
        yield f"mqtt://{netns_pair.addr_a}:1883"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_namespaces_find_each_other_and_resolve_the_broker(
        netns_pair: NetnsPair, netns_mosquitto: str, fleet: str) -> None:
    with announce_broker(netns_mosquitto, fleet, interface=netns_pair.addr_a, netns=netns_pair.a):
        listed = netns_pair.run(netns_pair.b, sys.executable, "-m", "fleetpipe", "discover", "--json",
                                "--fleet", fleet, "--interface", netns_pair.addr_b, "--timeout", "1.5")
        code = ("import time; from fleetpipe.config import NodeConfig; "
                "from fleetpipe.discovery import resolve_broker; t = time.monotonic(); "
                f"c = resolve_broker(NodeConfig(name='n1', fleet='{fleet}'), timeout_s=10, "
                f"interfaces=['{netns_pair.addr_b}']); print(c.broker.url, time.monotonic() - t)")
        resolved = netns_pair.run(netns_pair.b, sys.executable, "-c", code)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["role"], r["fleet"], r["addresses"], r["broker_url"]) for r in rows] == [
        ("broker", fleet, [netns_pair.addr_a], netns_mosquitto)]
    assert resolved.returncode == 0, resolved.stderr
    url, elapsed = resolved.stdout.split()
    assert url == netns_mosquitto
    print(f"\nresolve_broker across namespaces (advert already up): {float(elapsed):.2f} s")


def test_avahi_browse_sees_the_advert(netns_pair: NetnsPair, avahi: Avahi, fleet: str) -> None:
    url = f"mqtt://{netns_pair.addr_a}:1883"
    with announce_broker(url, fleet, interface=netns_pair.addr_a, netns=netns_pair.a):
        line = ""
        for _ in range(3):
            out = netns_pair.run(avahi.netns, "avahi-browse", "--resolve", "--parsable", "--terminate",
                                 "_fleetpipe._tcp", env=avahi.env, timeout=15)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("=") and fleet in ln), "")
            if line:
                break
    assert line, f"avahi-browse did not see the advert: {out.stdout!r} {out.stderr!r}"
    fields = line.split(";")
    assert fields[7] == netns_pair.addr_a and fields[8] == "1883"
    for prop in (f'"fleet={fleet}"', '"role=broker"', '"wire=1"', f'"broker={url}"'):
        assert prop in fields[9]
