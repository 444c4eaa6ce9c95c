"""A real mosquitto started from broker_config/secure.conf (TLS + passwords + ACL) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleetpipe.deploy import broker_config, certs, creds
from fleetpipe.errors import ConfigError
from fleetpipe.transport import TLSParameters
from fleetpipe.transport.mqtt import MqttBus
from tests.conftest import IN_CI, mosquitto_binary, unused_tcp_port

FLEET = "sec"
NODES = ("n1", "n2")
CLIENTS = ("c1", "c2")


@dataclass
class SecureBroker:
    proc: subprocess.Popen[bytes]
    port: int
    out: Path  # gen-creds / gen-certs output
    log: Path

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def ca(self) -> str:
        return str(self.out / "ca.crt")

    def password(self, identity: str) -> str:
        return (self.out / f"{identity}.password").read_text().strip()

    def bus(self, identity: str | None, *, password: str | None = None, client_id: str | None = None,
            tls: TLSParameters | None = None, url: str | None = None) -> MqttBus:
        """An MqttBus logged in as ``identity`` (None: anonymous) with the test CA."""
        if identity is not None and password is None:
            password = self.password(identity)
        return MqttBus(url or self.url, client_id=client_id or f"t-{identity}-{os.getpid()}-{time.monotonic_ns()}",
                       username=identity, password=password,
                       tls=tls if tls is not None else TLSParameters(ca_certs=self.ca))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_secure_broker(out: Path, *, builtin_hash: bool = False, fleet: str = FLEET, nodes: tuple[str, ...] = NODES,
                        clients: tuple[str, ...] = CLIENTS, observers: tuple[str, ...] = ("obs",)) -> SecureBroker:
    """gen-creds + gen-certs into ``out``, render secure.conf with dir=out/mosquitto, start mosquitto."""
    binary = mosquitto_binary()
    if binary is None:
        if IN_CI:
            pytest.fail("mosquitto is not installed; under CI this is a failure")
        pytest.skip("mosquitto binary not found")
    creds.generate(out, fleet=fleet, nodes=nodes, planner="planner", clients=clients, observers=observers,
                   mosquitto_passwd=None if builtin_hash else "auto")
    try:
        certs.generate(out, ["127.0.0.1", "localhost"])
    except ConfigError as exc:  # openssl missing: nothing to test TLS with
        pytest.skip(f"cannot make a test CA: {exc}")
    port = unused_tcp_port()
    conf = out / "mosquitto" / "test.conf"
    text = broker_config.render("secure.conf", port=port, bind="127.0.0.1", dir=out / "mosquitto")
    if os.geteuid() == 0:
        # As root mosquitto drops to its own user before reading passwd/acl, which live in a 0700
        # pytest directory here. Production: `chown -R mosquitto: OUT/mosquitto` (gen-creds does it).
        text += "\nuser root\n"
    conf.write_text(text)
    log = out / "mosquitto.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mosquitto exited at start: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return SecureBroker(proc, port, out, log)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    pytest.fail("mosquitto did not start listening within 10 s")


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    broker = start_secure_broker(tmp_path_factory.mktemp("secure"))
    yield broker
    broker.stop()


def run(coro: Coroutine[Any, Any, Any], timeout: float = 20) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())
