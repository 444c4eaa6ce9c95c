"""Transport benchmark: MqttBus (QoS 1 via a private mosquitto) against a raw TCP loopback baseline.

    .venv/bin/python bench/transport.py [--quick]

Measured in the same run, on 127.0.0.1:
- ping-pong round trip (median) for 1 KB, 64 KB, 1 MB, 8 MB payloads. MQTT: client -> broker -> echo
  client -> broker -> client (4 socket hops, QoS 1, each publish awaits its PUBACK). Raw: client ->
  echo thread -> client over one TCP connection with 4-byte length-prefix framing (2 hops).
- one-way throughput: MQTT with up to 32 QoS 1 publishes in flight to a subscriber; raw: framed
  writes to a sink thread that answers once at the end.
- TCP_NODELAY off vs on for small (1 KB) QoS 1 ping-pong.
- 1 MB / 8 MB MQTT again after mallopt(M_MMAP_THRESHOLD) (DESIGN.md page-fault trap), glibc only.
Prints absolute numbers and MQTT/raw ratios. The broker is started here (broker_config/lab.conf).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fleetpipe.deploy import broker_config
from fleetpipe.node.daemon import tune_malloc
from fleetpipe.transport.mqtt import MqttBus

SIZES = [("1 KB", 1024), ("64 KB", 64 * 1024), ("1 MB", 1024 * 1024), ("8 MB", 8 * 1024 * 1024)]
# (ping-pong rounds, throughput messages) per size, full / quick
COUNTS = {
    1024: ((300, 3000), (100, 800)),
    64 * 1024: ((150, 800), (40, 200)),
    1024 * 1024: ((30, 100), (10, 30)),
    8 * 1024 * 1024: ((6, 16), (3, 6)),
}
WINDOW = 32


# --- broker ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mosquitto() -> Iterator[str]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(broker_config.render("lab.conf", port=port, bind="127.0.0.1"))
        proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("mosquitto did not start") from None
                    time.sleep(0.05)
            yield f"mqtt://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(5)


# --- MQTT --------------------------------------------------------------------------------------


async def mqtt_pingpong(url: str, size: int, rounds: int, nodelay: bool = True) -> float:
    """Median round trip in seconds."""
    payload = bytes(size)
    async with (
        MqttBus(url, client_id="bench-echo", tcp_nodelay=nodelay) as echo,
        MqttBus(url, client_id="bench-client", tcp_nodelay=nodelay) as client,
    ):
        await echo.subscribe("bench/ping", qos=1)
        await client.subscribe("bench/pong", qos=1)

        async def echo_loop() -> None:
            async for m in echo.messages():
                await echo.publish("bench/pong", m.payload, qos=1)

        task = asyncio.create_task(echo_loop())
        replies = client.messages()
        times = []
        for i in range(rounds + 2):
            t0 = time.perf_counter()
            await client.publish("bench/ping", payload, qos=1)
            await anext(replies)
            if i >= 2:  # warm-up
                times.append(time.perf_counter() - t0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return statistics.median(times)


async def mqtt_throughput(url: str, size: int, count: int) -> float:
    """Payload bytes per second, publisher to subscriber."""
    payload = bytes(size)
    async with (
        MqttBus(url, client_id="bench-pub") as pub,
        MqttBus(url, client_id="bench-sub", queue_maxsize=256) as sub,
    ):
        await sub.subscribe("bench/tp", qos=1)
        done = asyncio.Event()

        async def consume() -> None:
            n = 0
            async for _ in sub.messages():
                n += 1
                if n == count:
                    done.set()
                    return

        consumer = asyncio.create_task(consume())
        sem = asyncio.Semaphore(WINDOW)

        async def one() -> None:
            async with sem:
                await pub.publish("bench/tp", payload, qos=1)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        await done.wait()
        elapsed = time.perf_counter() - t0
        await consumer
    return size * count / elapsed


# --- raw TCP baseline --------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int, buf: bytearray) -> memoryview:
    view = memoryview(buf)[:n]
    got = 0
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise ConnectionError("peer closed")
        got += r
    return view


def _serve(listener: socket.socket, mode: str, count: int) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(16 * 1024 * 1024)
    hdr = bytearray(4)
    with conn:
        for _ in range(count):
            (n,) = struct.unpack("!I", _recv_exact(conn, 4, hdr))
            body = _recv_exact(conn, n, buf)
            if mode == "echo":
                conn.sendall(struct.pack("!I", n))
                conn.sendall(body)
        if mode == "sink":
            conn.sendall(b"k")


def _raw_run(mode: str, size: int, count: int) -> list[float]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    server = threading.Thread(target=_serve, args=(listener, mode, count), daemon=True)
    server.start()
    payload = bytes(size)
    frame_hdr = struct.pack("!I", size)
    buf = bytearray(16 * 1024 * 1024)
    hdr = bytearray(4)
    times = []
    with socket.create_connection(listener.getsockname()) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t_start = time.perf_counter()
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(frame_hdr)
            sock.sendall(payload)
            if mode == "echo":
                (n,) = struct.unpack("!I", _recv_exact(sock, 4, hdr))
                _recv_exact(sock, n, buf)
                times.append(time.perf_counter() - t0)
        if mode == "sink":
            _recv_exact(sock, 1, hdr)
            times.append(time.perf_counter() - t_start)
    server.join()
    listener.close()
    return times


def raw_pingpong(size: int, rounds: int) -> float:
    return statistics.median(_raw_run("echo", size, rounds + 2)[2:])


def raw_throughput(size: int, count: int) -> float:
    return size * count / _raw_run("sink", size, count)[0]


# --- main --------------------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{s * 1e3:8.3f} ms"


def _mbs(b: float) -> str:
    return f"{b / 1e6:8.1f} MB/s"


async def amain(quick: bool) -> None:
    with mosquitto() as url:
        print(f"broker {url} (lab.conf, set_tcp_nodelay true); python {sys.version.split()[0]}")
        print()
        header = (
            f"{'payload':>8} | {'MQTT rtt':>11} {'raw rtt':>11} {'ratio':>7} | "
            f"{'MQTT tput':>13} {'raw tput':>13} {'ratio':>7}"
        )
        print(header)
        print("-" * len(header))
        for label, size in SIZES:
            rounds, count = COUNTS[size][1 if quick else 0]
            m_rtt = await mqtt_pingpong(url, size, rounds)
            r_rtt = raw_pingpong(size, rounds)
            m_tp = await mqtt_throughput(url, size, count)
            r_tp = raw_throughput(size, count)
            print(
                f"{label:>8} | {_ms(m_rtt)} {_ms(r_rtt)} {m_rtt / r_rtt:6.1f}x | "
                f"{_mbs(m_tp)} {_mbs(r_tp)} {m_tp / r_tp:6.2f}x"
            )
        print()
        rounds = 40 if quick else 100
        off = await mqtt_pingpong(url, 1024, rounds, nodelay=False)
        on = await mqtt_pingpong(url, 1024, rounds, nodelay=True)
        print(f"TCP_NODELAY, 1 KB QoS 1 ping-pong median: off {_ms(off)}, on {_ms(on)} ({off / on:.1f}x)")
        if tune_malloc():
            for label, size in SIZES[2:]:
                rounds, count = COUNTS[size][1 if quick else 0]
                rtt = await mqtt_pingpong(url, size, rounds)
                tp = await mqtt_throughput(url, size, count)
                print(f"mallopt(M_MMAP_THRESHOLD=64 MB), {label}: MQTT rtt {_ms(rtt)}, tput {_mbs(tp)}")
        print("MQTT rtt = 4 socket hops via the broker, raw rtt = 2 hops; ratio > 1 means MQTT is slower.")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds (CI smoke run)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    asyncio.run(amain(args.quick))
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
