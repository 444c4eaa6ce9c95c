"""Time to discovery: broker advert start -> resolve_broker result, against a static-URL baseline.

    .venv/bin/python bench/discovery.py [--rounds N]

Measured in the same run, on 127.0.0.1 only (no multicast leaves the host):
- cold: the clock starts when an Announcer for a TCP listener starts registering; async_resolve_broker
  then browses, TCP-checks and returns the URL (a broker and a node booting together);
- warm: resolve_broker while the advert is already up (a node joining a running fleet);
- static: the fallback path alone (one TCP connect to a known URL, timeout_s=0 browse).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import statistics
import time

from fleetpipe.config import BrokerConfig, NodeConfig
from fleetpipe.discovery import Announcer, async_resolve_broker

LOOPBACK = ["127.0.0.1"]


async def one_round() -> tuple[float, float, float]:
    """Return (cold, warm, static) seconds for one fresh fleet."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"mqtt://127.0.0.1:{port}"
    fleet = f"bench-{secrets.token_hex(3)}"
    config = NodeConfig(name="n1", fleet=fleet)
    try:
        started = time.monotonic()
        async with Announcer("broker", "b", fleet, port, {"broker": url}, interfaces=LOOPBACK):
            found = await async_resolve_broker(config, timeout_s=10, interfaces=LOOPBACK)
            cold = time.monotonic() - started
            assert found.broker.url == url, found.broker.url
            started = time.monotonic()
            await async_resolve_broker(config, timeout_s=10, interfaces=LOOPBACK)
            warm = time.monotonic() - started
        static_cfg = NodeConfig(name="n1", fleet=fleet, broker=BrokerConfig(static_fallback=(url,)))
        started = time.monotonic()
        await async_resolve_broker(static_cfg, timeout_s=0, interfaces=LOOPBACK)
        static = time.monotonic() - started
    finally:
        server.close()
        await server.wait_closed()
    return cold, warm, static


def main() -> None:
    """Run the rounds and print medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    logging.getLogger("fleetpipe.discovery").setLevel(logging.ERROR)  # the static rounds warn by design
    results = [asyncio.run(one_round()) for _ in range(rounds)]
    cold, warm, static = (statistics.median(col) for col in zip(*results, strict=True))
    print(f"time to discovery over {rounds} rounds (median, loopback):")
    print(f"  cold (advert registers, then resolver)  {cold * 1000:8.1f} ms")
    print(f"  warm (advert already up)                {warm * 1000:8.1f} ms")
    print(f"  static URL baseline                     {static * 1000:8.1f} ms")
    print(f"  cold / static = {cold / static:.0f}x, warm / static = {warm / static:.0f}x")


if __name__ == "__main__":
    main()
