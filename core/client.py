"""Client API: submit frames to a fleet and get results back, exactly once each.

Theory of operation. The client reads the retained plan to learn the current epoch and the input
names of stage 0, and publishes each frame to stage 0 of that epoch with its own result topic as
the MQTT v5 response topic. At most ``window`` frames are in flight (end-to-end credit: a result
frees a slot), so a slow stage slows the source instead of overflowing a broker queue. Every frame
id stays pending until its result arrives; a pending frame is re-sent (same id) when a newer plan
epoch appears (its path may have died with the old plan), when a node reports it stale, or when it
has waited longer than the resend timeout. Results are de-duplicated by frame id, so the caller
sees every frame exactly once even if a re-sent copy also completes.

Frame ids are 128 random bits (nobody can predict the next one to answer it first), and a result is
accepted only for a frame id this client issued and still has pending; a result for an id it never
issued is logged (rate-limited) and dropped, not counted as a duplicate.

A frame ends in an error instead of a result when a node reports that the frame itself is wrong
(``InferenceError``: wrong shape, rank or dtype; ``DecodeError``): re-sending it would fail the same way.
When the planner publishes an *infeasible* plan (the alive nodes cannot run the model), every pending
and new frame fails at once with ``FleetUnavailable`` naming what is short; the next feasible plan
lifts that and new frames run again. The client follows only plans of the planner whose birth
(``PlannerState``) it sees, so a plan forged on an open broker does not redirect its frames.

``AsyncFleetClient`` is the asyncio core; ``FleetClient`` runs it on a private loop thread for
synchronous callers (``infer``, ``submit`` returning a ``concurrent.futures.Future``, ``stream``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetpipe import codec, timing, topics, wire
from fleetpipe._compat import wait_for
from fleetpipe.errors import (
    BrokerUnavailable,
    DecodeError,
    FleetpipeError,
    FleetUnavailable,
    InferenceError,
    VersionMismatch,
)
from fleetpipe.ratelog import RateLimitedLog
from fleetpipe.transport.mqtt import MqttBus

__all__ = ["DEFAULT_WINDOW", "AsyncFleetClient", "ClientStats", "FleetClient", "FrameResult"]

DEFAULT_WINDOW = 8  # frames in flight per client (the planner prices a plan's latency with it)

log = logging.getLogger("fleetpipe.client")
_DONE_KEPT = 4096  # completed frame ids remembered to tell a late duplicate from a result this client never asked for


@dataclass(frozen=True, slots=True)
class FrameResult:
    """One frame's result: output arrays by name, plus where and how long it went."""

    frame_id: str
    outputs: dict[str, np.ndarray]
    epoch: int
    latency_ms: float
    hops: tuple[Any, ...]
    attempts: int
    # COACH early exit: a stage answered with the top label (``outputs`` is then ``{"label": [label]}``).
    early_exit: bool = False
    label: int | None = None

    @property
    def output(self) -> np.ndarray:
        """The first (usually only) output."""
        return next(iter(self.outputs.values()))

    @property
    def top1(self) -> int:
        """The predicted class: the early-exit label, else the argmax of the output."""
        return int(self.label) if self.label is not None else int(np.argmax(self.output))


@dataclass(slots=True)
class ClientStats:
    """Counters a caller (demo, bench, tests) can check."""

    submitted: int = 0
    completed: int = 0
    resent: int = 0
    duplicates: int = 0
    foreign: int = 0  # results for frame ids this client never issued (forged or misrouted): dropped
    stale_reports: int = 0
    early_exits: int = 0
    failed: int = 0  # frames that ended with an error (a node's InferenceError, FleetUnavailable)
    errors: list[str] = field(default_factory=list)


#: Error kinds a node reports about a frame that would fail the same way again: the frame ends with it.
FRAME_FATAL = {"InferenceError": InferenceError, "DecodeError": DecodeError, "VersionMismatch": VersionMismatch}


@dataclass(slots=True)
class _Pending:
    frame_id: str
    inputs: dict[str, np.ndarray]
    future: asyncio.Future[FrameResult]
    first_sent: float
    sent: float = 0.0
    epoch: int = -1
    attempts: int = 0


class AsyncFleetClient:
    """Asyncio client of one fleet. Use ``async with AsyncFleetClient(url) as client``."""

    def __init__(self, url: str, *, fleet: str = "default", client_id: str | None = None,
                 window: int = DEFAULT_WINDOW, bits: int = 32, resend_s: float | None = None,
                 username: str | None = None, password: str | None = None, tls: Any = None) -> None:
        self.url = url
        self.fleet = fleet
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:8]}"
        self.window = window
        self.bits = bits
        self.resend_s = resend_s
        self.stats = ClientStats()
        self.plan: Any = None
        # The planner whose birth we saw (its session id and whether it is online); None until one is seen.
        self.planner: Any = None
        # Set while the planner says the fleet is infeasible: every frame fails with it.
        self.unavailable: FleetUnavailable | None = None
        self._seen_epoch = -1
        self._bus = MqttBus(url, client_id=f"fp-{fleet}-{self.client_id}", username=username, password=password,
                            tls=tls, on_connect=self._on_connect)
        self._pending: dict[str, _Pending] = {}
        self._done: OrderedDict[str, None] = OrderedDict()  # recently completed frame ids (bounded)
        self._bad = RateLimitedLog(log)
        self._credits = asyncio.Semaphore(window)
        self._plan_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> AsyncFleetClient:
        await self._bus.__aenter__()
        self._tasks = [asyncio.create_task(self._receive(), name="client-receive"),
                       asyncio.create_task(self._watchdog(), name="client-watchdog")]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(BrokerUnavailable("client closed before the result arrived"))
        await self._bus.__aexit__(None, None, None)

    async def _on_connect(self, _bus: object) -> None:
        # The planner's state first: its retained birth arrives before the retained plan it vouches for.
        await self._bus.subscribe(topics.planner_state(self.fleet), qos=1)
        await self._bus.subscribe(topics.plan(self.fleet), qos=1)
        await self._bus.subscribe(topics.result(self.fleet, self.client_id), qos=1)
        await self._bus.subscribe(topics.error(self.fleet), qos=1)

    async def wait_plan(self, timeout_s: float = 60.0) -> Any:
        """Wait until a plan is known; returns it."""
        await wait_for(self._plan_event.wait(), timeout_s)
        return self.plan

    async def submit(self, inputs: np.ndarray | Mapping[str, np.ndarray], *,
                     frame_id: str | None = None) -> asyncio.Future[FrameResult]:
        """Send one frame (waits for a window slot); returns a future of its result."""
        await self.wait_plan()
        future: asyncio.Future[FrameResult] = asyncio.get_running_loop().create_future()
        if self.unavailable is not None:
            self.stats.submitted += 1
            self.stats.failed += 1
            future.set_exception(self.unavailable)
            return future
        await self._credits.acquire()
        if self.unavailable is not None:  # the fleet went infeasible while we waited for a slot
            self._credits.release()
            self.stats.submitted += 1
            self.stats.failed += 1
            future.set_exception(self.unavailable)
            return future
        feeds = self._feeds(inputs)
        fid = frame_id or secrets.token_hex(16)  # 128 random bits: nobody else can guess a pending id
        pending = _Pending(fid, feeds, future, first_sent=time.monotonic())
        self._pending[fid] = pending
        self.stats.submitted += 1
        await self._send(pending)
        return future

    async def infer(self, inputs: np.ndarray | Mapping[str, np.ndarray], timeout_s: float = 120.0) -> FrameResult:
        """Run one frame through the fleet and return its result."""
        future = await self.submit(inputs)
        return await wait_for(future, timeout_s)

    async def stream(self, frames: Iterable[np.ndarray | Mapping[str, np.ndarray]],
                     timeout_s: float | None = None) -> AsyncIterator[FrameResult]:
        """Yield results in input order, keeping up to ``window`` frames in flight.

        A frame that fails raises its error (``FleetUnavailable``, ``InferenceError``, ...); with ``timeout_s``
        a result that does not come within that long raises ``TimeoutError``.
        """
        queue: asyncio.Queue[asyncio.Future[FrameResult] | None] = asyncio.Queue(maxsize=self.window)

        async def feed() -> None:
            for frame in frames:
                await queue.put(await self.submit(frame))
            await queue.put(None)

        feeder = asyncio.create_task(feed())
        try:
            while (future := await queue.get()) is not None:
                yield await wait_for(future, timeout_s)
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder

    # -- internals -------------------------------------------------------------------------------

    def _feeds(self, inputs: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = tuple(self.plan.stages[0].input_names)
        if isinstance(inputs, np.ndarray):
            if len(names) != 1:
                raise ValueError(f"the model takes {len(names)} inputs {names}; pass a mapping")
            return {names[0]: inputs}
        missing = set(names) - set(inputs)
        if missing:
            raise ValueError(f"missing model inputs {sorted(missing)}")
        return {name: np.asarray(inputs[name]) for name in names}

    async def _send(self, pending: _Pending) -> None:
        plan = self.plan
        pending.epoch = int(plan.epoch)
        pending.attempts += 1
        pending.sent = time.monotonic()
        tensors = tuple((name, codec.encode_tensor(arr, bits=self.bits if arr.dtype.kind == "f" else 32))
                        for name, arr in pending.inputs.items())
        frame = wire.Activation(fleet=self.fleet, epoch=pending.epoch, frame_id=pending.frame_id,
                                client_id=self.client_id, stage=0, tensors=tensors,
                                reply_to=topics.result(self.fleet, self.client_id), sent_ts=time.time(), hops=())
        topic = topics.stage_in(self.fleet, pending.epoch, 0, self.client_id)
        await self._bus.publish(topic, wire.encode(frame), qos=1)

    async def _resend(self, pending: _Pending, why: str) -> None:
        if pending.future.done() or self.plan is None:
            return
        self.stats.resent += 1
        log.info("client %s: re-sending %s (%s)", self.client_id, pending.frame_id, why)
        with contextlib.suppress(FleetpipeError):
            await self._send(pending)

    async def _receive(self) -> None:
        async for message in self._bus.messages():
            try:
                msg = wire.decode(message.payload) if message.payload else None
            except DecodeError as exc:
                log.warning("client %s: undecodable message on %s: %s", self.client_id, message.topic, exc)
                continue
            if isinstance(msg, wire.Plan):
                await self._on_plan(msg)
            elif isinstance(msg, wire.PlannerState) and msg.fleet == self.fleet:
                self._on_planner(msg)
            elif isinstance(msg, wire.Result):
                try:
                    topics.check(message.topic, msg)
                    if message.topic != topics.result(self.fleet, self.client_id):
                        raise ValueError(f"not this client's result topic: {message.topic}")
                except ValueError as exc:
                    self._bad.warning("client %s: result refused: %s", self.client_id, exc)
                    continue
                self._on_result(msg)
            elif isinstance(msg, wire.ErrorReport) and msg.frame_id in self._pending:
                self.stats.errors.append(f"{msg.source}: {msg.kind}: {msg.detail}")
                if msg.kind in FRAME_FATAL:
                    self._fail(self._pending[msg.frame_id], FRAME_FATAL[msg.kind](f"{msg.source}: {msg.detail}"))
                elif msg.kind == "StaleEpoch":
                    self.stats.stale_reports += 1
                    pending = self._pending[msg.frame_id]
                    if self.plan is not None and pending.epoch < self.plan.epoch:
                        await self._resend(pending, "stale epoch")

    def _on_planner(self, msg: Any) -> None:
        if self.planner is not None and msg.planner_id == self.planner.planner_id and msg.seq < self.planner.seq:
            return  # an older state of the same planner
        if msg.online or self.planner is None or msg.planner_id == self.planner.planner_id:
            self.planner = msg

    async def _on_plan(self, plan: Any) -> None:
        if plan.fleet != self.fleet or plan.epoch <= self._seen_epoch:
            return
        if self.planner is not None and self.planner.online and plan.planner_id != self.planner.planner_id:
            log.warning("client %s: ignoring plan epoch %d of planner %r (the planner is %r)", self.client_id,
                        plan.epoch, plan.planner_id, self.planner.planner_id)
            return
        self._seen_epoch = int(plan.epoch)
        if plan.status == "infeasible":
            self.unavailable = FleetUnavailable(f"the fleet cannot run the model: {plan.detail or 'infeasible plan'}")
            log.warning("client %s: %s", self.client_id, self.unavailable)
            for pending in list(self._pending.values()):
                self._fail(pending, self.unavailable)
            self._plan_event.set()
            return
        self.unavailable = None
        self.plan = plan
        self._plan_event.set()
        for pending in list(self._pending.values()):
            if pending.epoch < plan.epoch and pending.attempts:
                await self._resend(pending, f"new plan epoch {plan.epoch}")

    def _fail(self, pending: _Pending, exc: FleetpipeError) -> None:
        """End a pending frame with an error (frees its window slot; a late result counts as a duplicate)."""
        if self._pending.pop(pending.frame_id, None) is None:
            return
        self._credits.release()
        self.stats.failed += 1
        if not pending.future.done():
            pending.future.set_exception(exc)

    def _on_result(self, result: Any) -> None:
        pending = self._pending.pop(result.frame_id, None)
        if pending is None:
            if result.frame_id in self._done:
                self.stats.duplicates += 1
            else:
                self.stats.foreign += 1
                self._bad.warning("client %s: result for frame %s, which it never sent or no longer waits for; "
                                  "dropped", self.client_id, result.frame_id)
            return
        self._done[result.frame_id] = None
        if len(self._done) > _DONE_KEPT:
            self._done.popitem(last=False)
        self._credits.release()
        self.stats.completed += 1
        if pending.future.done():
            return
        try:
            outputs = {name: codec.decode_tensor(t) for name, t in result.tensors}
        except (DecodeError, ValueError) as exc:
            pending.future.set_exception(DecodeError(f"result of {result.frame_id}: {exc}"))
            return
        if result.early_exit:
            self.stats.early_exits += 1
        pending.future.set_result(FrameResult(result.frame_id, outputs, int(result.epoch),
                                              (time.monotonic() - pending.first_sent) * 1000,
                                              tuple(result.hops), pending.attempts, bool(result.early_exit),
                                              result.label))

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            limit = self.resend_s if self.resend_s is not None else timing.FRAME_RESEND_S
            now = time.monotonic()
            for pending in list(self._pending.values()):
                if pending.attempts and now - pending.sent > limit:
                    await self._resend(pending, f"no result after {limit:.1f} s")


class FleetClient:
    """Synchronous client: runs an ``AsyncFleetClient`` on a private event-loop thread."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fleetpipe-client", daemon=True)
        self._thread.start()
        self._client = AsyncFleetClient(url, **kwargs)
        try:
            self._call(self._client.__aenter__(), 30)
        except BaseException:
            self._stop_loop()
            raise

    @property
    def stats(self) -> ClientStats:
        return self._client.stats

    @property
    def plan(self) -> Any:
        return self._client.plan

    def wait_plan(self, timeout_s: float = 60.0) -> Any:
        """Block until a plan is known."""
        return self._call(self._client.wait_plan(timeout_s), timeout_s + 5)

    def submit(self, inputs: np.ndarray | Mapping[str, np.ndarray],
               timeout_s: float | None = None) -> concurrent.futures.Future[FrameResult]:
        """Send one frame; returns a future of its result.

        Blocks while the window is full (up to ``timeout_s``, then ``TimeoutError``), so a producer
        loop is paced by the fleet instead of queueing frames without bound.
        """
        outer: concurrent.futures.Future[FrameResult] = concurrent.futures.Future()
        sent: concurrent.futures.Future[None] = concurrent.futures.Future()

        async def go() -> None:
            try:
                inner = await self._client.submit(inputs)
            except BaseException as exc:
                sent.set_exception(exc)
                return
            sent.set_result(None)
            try:
                outer.set_result(await inner)
            except BaseException as exc:
                outer.set_exception(exc)

        task = asyncio.run_coroutine_threadsafe(go(), self._loop)
        try:
            sent.result(timeout_s)
        except concurrent.futures.TimeoutError:
            task.cancel()
            raise TimeoutError(f"no window slot within {timeout_s} s (the fleet is not returning results)") from None
        return outer

    def infer(self, inputs: np.ndarray | Mapping[str, np.ndarray], timeout_s: float = 120.0) -> np.ndarray:
        """Run one frame and return its (first) output array."""
        return self.infer_result(inputs, timeout_s).output

    def infer_result(self, inputs: np.ndarray | Mapping[str, np.ndarray], timeout_s: float = 120.0) -> FrameResult:
        """Run one frame and return its full result (outputs, latency, hops)."""
        return self._call(self._client.infer(inputs, timeout_s), timeout_s + 5)

    def stream(self, frames: Iterable[np.ndarray | Mapping[str, np.ndarray]], timeout_s: float | None = None, *,
               deadline: float | None = None, errors: str = "raise") -> Iterator[Any]:
        """Yield results in order, keeping a window of frames in flight.

        A frame that fails raises its error: ``FleetUnavailable`` while the planner says the fleet cannot run
        the model, ``InferenceError`` for a frame a node rejects. With ``errors="yield"`` the stream yields the
        error in that frame's place and goes on, so a long stream rides out an outage by itself (its frames
        fail at once while the fleet is infeasible and run again when the nodes return).
        ``timeout_s`` bounds the wait for each result (and for each window slot); ``deadline`` (a
        ``time.monotonic()`` instant) bounds the whole stream. Either raises ``TimeoutError``.
        """
        if errors not in ("raise", "yield"):
            raise ValueError(f"errors must be 'raise' or 'yield', not {errors!r}")
        futures: list[concurrent.futures.Future[FrameResult]] = []

        def left() -> float | None:
            if deadline is None:
                return timeout_s
            remaining = max(deadline - time.monotonic(), 0.0)
            return remaining if timeout_s is None else min(timeout_s, remaining)

        def result(future: concurrent.futures.Future[FrameResult]) -> Any:
            try:
                return future.result(left())
            except FleetpipeError as exc:
                if errors == "yield":
                    return exc
                raise
            except concurrent.futures.TimeoutError:
                raise TimeoutError(f"no result within {timeout_s if deadline is None else 'the deadline'}"
                                   f"{' s' if deadline is None else ''}") from None

        for frame in frames:
            futures.append(self.submit(frame, left()))
            while len(futures) >= self._client.window:
                yield result(futures.pop(0))
        for future in futures:
            yield result(future)

    def close(self) -> None:
        """Disconnect, cancel what is still pending and stop the loop thread."""
        with contextlib.suppress(Exception):
            self._call(self._client.__aexit__(None, None, None), 10)
        with contextlib.suppress(Exception):
            self._call(_cancel_all(), 5)
        self._stop_loop()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, coro: Any, timeout_s: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


async def _cancel_all() -> None:
    """Cancel every other task on this loop (submissions still waiting for a window slot)."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
