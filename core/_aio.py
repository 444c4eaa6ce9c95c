"""Small asyncio helpers shared by the daemons (private; no transport or runtime imports)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["Stopped", "in_daemon_thread", "unless_stopped"]

T = TypeVar("T")


class Stopped(Exception):
    """The awaited work was abandoned because the daemon was told to exit."""


async def unless_stopped(aw: Awaitable[T], stop: asyncio.Event) -> T:
    """Await ``aw`` unless ``stop`` is set first: then cancel it and raise :class:`Stopped`.

    A daemon waiting for its broker (or a model) must still honour SIGTERM, which only sets ``stop``.
    """
    work = asyncio.ensure_future(aw)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work
    raise Stopped


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a daemon thread: unlike ``asyncio.to_thread``, a process told to exit meanwhile
    does not wait for it (``asyncio.run`` joins the default executor's threads)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)

    def target() -> None:
        try:
            value = fn(*args)
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=target, name=f"fleetpipe-{getattr(fn, '__name__', 'work')}", daemon=True).start()
    return await fut
