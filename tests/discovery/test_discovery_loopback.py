"""Announce and browse on 127.0.0.1: between processes, fleets apart, duplicate node ids."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from fleetpipe.discovery import SERVICE_TYPE, Announcer, Found, async_browse, browse
from fleetpipe.errors import DiscoveryError

from .conftest import LOOPBACK, announce_broker

pytestmark = pytest.mark.integration


def _wait_browse(fleet: str, predicate: object, timeout_s: float = 12.0) -> list[Found]:
    """Browse in rounds until ``predicate(found)`` holds.

    A fresh browser sees its first answer ~1.2 s after it starts (query scheduling plus the responder's
    delay), so each round must be well over that.
    """
    deadline = time.monotonic() + timeout_s
    found: list[Found] = []
    while time.monotonic() < deadline:
        found = browse(fleet, timeout_s=2.5, interfaces=LOOPBACK)
        if predicate(found):  # type: ignore[operator]
            return found
    return found


def test_broker_announced_by_another_process_is_found_with_properties(fleet: str) -> None:
    with announce_broker("mqtt://127.0.0.1:18830", fleet) as ann:
        found = _wait_browse(fleet, lambda fs: any(f.role == "broker" for f in fs))
        elapsed = time.monotonic() - ann.started_at
    brokers = [f for f in found if f.service_type == SERVICE_TYPE]
    assert len(brokers) == 1, found
    b = brokers[0]
    assert (b.role, b.fleet, b.port, b.addresses) == ("broker", fleet, 18830, ("127.0.0.1",))
    assert b.properties["broker"] == "mqtt://127.0.0.1:18830"
    assert b.properties["wire"] == "1" and b.properties["instance"] == b.instance
    assert b.broker_url == "mqtt://127.0.0.1:18830" and not b.duplicate
    print(f"\ntime to discovery (process start -> browse result, incl. interpreter start): {elapsed:.2f} s")


def test_fleets_never_mix(fleet: str) -> None:
    other = fleet + "-other"
    with Announcer("node", "n1", fleet, 7001, interfaces=LOOPBACK, duplicate_check_s=0), \
            Announcer("node", "n1", other, 7002, interfaces=LOOPBACK, duplicate_check_s=0):
        mine = browse(fleet, timeout_s=2.5, interfaces=LOOPBACK)
        theirs = browse(other, timeout_s=2.5, interfaces=LOOPBACK)
    assert [(f.fleet, f.name, f.port) for f in mine if f.role == "node"] == [(fleet, "n1", 7001)]
    assert [(f.fleet, f.name, f.port) for f in theirs if f.role == "node"] == [(other, "n1", 7002)]
    assert not any(f.duplicate for f in mine + theirs)  # same id in two fleets is not a duplicate


def test_duplicate_node_id_is_refused_at_announce(fleet: str) -> None:
    with Announcer("node", "pi-1", fleet, 7001, interfaces=LOOPBACK) as first:
        second = Announcer("node", "pi-1", fleet, 7002, interfaces=LOOPBACK, duplicate_check_s=3.0)
        with pytest.raises(DiscoveryError, match=r"duplicate node id 'pi-1'.*127\.0\.0\.1") as err:
            second.__enter__()
        assert first.instance in str(err.value)
        with Announcer("node", "pi-2", fleet, 7003, interfaces=LOOPBACK, duplicate_check_s=0.3):
            pass  # another id in the same fleet is fine


def test_duplicate_node_ids_are_reported_by_browse(fleet: str) -> None:
    async def scenario() -> list[Found]:
        # duplicate_check_s=0: two processes racing past the check, as after a network partition
        async with Announcer("node", "pi-1", fleet, 7001, interfaces=LOOPBACK, duplicate_check_s=0), \
                Announcer("node", "pi-1", fleet, 7002, interfaces=LOOPBACK, duplicate_check_s=0), \
                Announcer("planner", "plan", fleet, 7003, interfaces=LOOPBACK):
            return await async_browse(fleet, timeout_s=1.5, interfaces=LOOPBACK)

    found = asyncio.run(scenario())
    nodes = [f for f in found if f.role == "node"]
    assert len(nodes) == 2 and all(f.duplicate for f in nodes), found
    assert len({f.instance for f in nodes}) == 2
    assert [f.duplicate for f in found if f.role == "planner"] == [False]


def test_discover_cli_prints_json_and_table(fleet: str) -> None:
    with Announcer("node", "n1", fleet, 7001, {"broker": "mqtt://127.0.0.1:1"}, interfaces=LOOPBACK):
        base = [sys.executable, "-m", "fleetpipe", "discover", "--fleet", fleet, "--interface", "127.0.0.1",
                "--timeout", "1.5"]
        out = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=30)
        env = {**os.environ, "COLUMNS": "200"}
        table = subprocess.run(base, capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    rows = [r for r in json.loads(out.stdout) if r["fleet"] == fleet]
    assert [(r["role"], r["name"], r["port"], r["broker_url"]) for r in rows] == [
        ("node", "n1", 7001, "mqtt://127.0.0.1:1")]
    assert table.returncode == 0, table.stderr
    assert "n1" in table.stdout and fleet in table.stdout and "mqtt://127.0.0.1:1" in table.stdout


def test_announcer_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match="role"):
        Announcer("client", "n1", "lab", 1)
    with pytest.raises(ValueError, match="port"):
        Announcer("node", "n1", "lab", 0)
    with pytest.raises(DiscoveryError, match="unknown interface"):
        Announcer("node", "n1", "lab", 1, interfaces=["no-such-if0"])
