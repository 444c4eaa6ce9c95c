"""The one seam between inference threads and the event loop (STYLE rule 8).

The loop never calls ``Runtime.run`` itself: ``InferenceExecutor.run`` hands the call to a dedicated
single-worker thread and awaits the result, so frames of one node run strictly one at a time in
arrival order and the loop stays responsive. Emulation stretch is applied in that worker thread
(``time.sleep`` after the real compute), so the stage is genuinely busy for the emulated time
while the loop keeps serving MQTT.

The other direction, a worker thread calling into the loop, goes through ``run_coro_threadsafe``,
which raises ``EventLoopBlocked`` instead of hanging when the loop does not answer in time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import numpy as np

from fleetpipe.errors import FleetpipeError, InferenceError, StageError
from fleetpipe.node.emulate import stretch
from fleetpipe.node.runtime import Runtime

__all__ = ["EventLoopBlocked", "InferenceExecutor", "run_coro_threadsafe"]

T = TypeVar("T")

WORKER_THREAD_PREFIX = "fleetpipe-infer"


class EventLoopBlocked(FleetpipeError):
    """The event loop did not run a coroutine submitted from another thread within the timeout."""


# An emulating worker idle longer than this before a run times a second, warm run (see ``_run_in_worker``).
WARM_GAP_S = 0.02
# Only factors this large rerun: two passes take at most half the emulated busy time, so the emulated
# fleet's CPU use stays bounded (a streaming x2.5 node would otherwise keep a core 80 % busy).
WARM_MIN_FACTOR = 4.0


class InferenceExecutor:
    """Runs a runtime on a dedicated single-worker thread; ``compute_factor`` > 1 emulates slower hardware.

    Emulating, a single-threaded run's CPU time is stretched by the factor. A run that follows an idle
    worker (every run of an emulated device: it sleeps ``factor - 1`` times its compute) starts with the
    host's caches cold, and on a shared virtual machine that costs a fixed ~20 ms of CPU per run after
    0.5 s idle (a 3.7 ms ResNet-50 slice measured 25 ms; the second run right after, 5 ms): stretched
    by the factor, that would emulate a device many times slower than the factor says, and most for the
    short runs of split parts. So with ``warm_rerun`` an emulating worker (factor >= ``WARM_MIN_FACTOR``)
    idle for more than ``WARM_GAP_S`` runs the slice twice and times the second, warm run: the emulated
    device is then ``factor`` times the host as the planner profiled it (back to back, warm).
    """

    def __init__(
        self, runtime: Runtime, *, compute_factor: float = 1.0, name: str = WORKER_THREAD_PREFIX,
        warm_rerun: bool = True,
    ) -> None:
        if compute_factor < 1.0:
            raise ValueError(f"compute_factor must be >= 1, got {compute_factor}")
        self.runtime = runtime
        self.compute_factor = compute_factor
        self.warm_rerun = warm_rerun
        self.warm_reruns = 0  # runs timed on a second, warm pass
        self._idle_since = 0.0  # perf_counter when the worker's last real compute ended
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending = 0
        self._closed = False
        self.last_real_ms = 0.0

    @property
    def pending(self) -> int:
        """Frames submitted and not yet finished (queue depth including the running one)."""
        return self._pending

    async def run(
        self, inputs: Mapping[str, np.ndarray], runtime: Runtime | None = None
    ) -> tuple[dict[str, np.ndarray], float]:
        """Run the slice off the loop; returns (outputs, compute_ms) where compute_ms includes the stretch.

        ``compute_ms`` is the time the (emulated) device was busy; the real compute time of the
        same call is in ``last_real_ms``. ``runtime`` runs another loaded slice on the same worker
        thread (the units and parts of a split stage). Raises InferenceError (or another StageError).
        """
        if self._closed:
            raise InferenceError("inference executor is shut down")
        loop = asyncio.get_running_loop()
        self._pending += 1
        try:
            return await loop.run_in_executor(self._pool, self._run_in_worker, inputs, runtime or self.runtime)
        except RuntimeError as exc:  # submit after shutdown raced with us
            raise InferenceError(f"inference executor unavailable: {exc}") from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                # shutdown() cancelled the queued frame, not our caller: report it as a stage error.
                raise InferenceError("frame dropped: inference executor shut down") from None
            raise
        finally:
            self._pending -= 1

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker thread, between frames (a one-off job such as profiling the slice:
        serialised with inference, it neither competes with a frame for the core nor sees one in its timings)."""
        if self._closed:
            raise InferenceError("inference executor is shut down")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self, *, wait: bool = True) -> None:
        """Stop accepting work, drop queued frames and (by default) join the worker thread."""
        self._closed = True
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> InferenceExecutor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def _run_in_worker(
        self, inputs: Mapping[str, np.ndarray], runtime: Runtime
    ) -> tuple[dict[str, np.ndarray], float]:
        """Worker-thread body: real compute, then the emulation stretch."""
        start = time.perf_counter()
        cpu_start = time.thread_time()
        cpu_time = getattr(runtime, "threads", 0) == 1 and self.compute_factor > 1.0
        cold = (cpu_time and self.warm_rerun and self.compute_factor >= WARM_MIN_FACTOR
                and start - self._idle_since > WARM_GAP_S)
        try:
            outputs = runtime.run(inputs)
            if cold:  # time a warm pass instead (class docstring); the outputs are the same
                cpu_start = time.thread_time()
                outputs = runtime.run(inputs)
                self.warm_reruns += 1
        except StageError:
            raise
        except Exception as exc:  # a backend that forgot to translate: still a typed error for the loop
            raise InferenceError(f"runtime failed: {exc!r}") from exc
        finally:
            self._idle_since = time.perf_counter()
        real_ms = (time.perf_counter() - start) * 1e3
        self.last_real_ms = real_ms
        busy_ms = None  # the emulated device's busy time, when it is defined by CPU work
        if self.compute_factor <= 1.0:
            extra_ms = 0.0
        elif cpu_time:
            # A single-threaded CPU runtime runs on this worker thread, so its CPU time is the work done.
            # Emulate "this much CPU work on a device `factor` times slower": stretch the thread's CPU time,
            # so other processes competing for the host's cores do not inflate the emulated device's time.
            cpu_ms = (time.thread_time() - cpu_start) * 1e3
            busy_ms = self.compute_factor * cpu_ms
            extra_ms = max(busy_ms - real_ms, 0.0)
        else:
            extra_ms = stretch(real_ms, self.compute_factor)
        if extra_ms > 0:
            time.sleep(extra_ms / 1e3)
        if busy_ms is not None:
            # The emulated device's time is its CPU work x factor. When the host preempts this thread (more
            # node processes than cores) the wall time can run past it; that, and how late the thread wakes
            # from the stretch, is the host's scheduling, not the device's, so it is not reported.
            return outputs, busy_ms
        return outputs, real_ms + extra_ms if extra_ms > 0 else (time.perf_counter() - start) * 1e3


def run_coro_threadsafe(coro: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop, timeout: float) -> T:
    """Run ``coro`` on ``loop`` from another thread and wait for it; raises EventLoopBlocked on timeout."""
    if _running_loop_in_this_thread() is loop:
        coro.close()
        raise RuntimeError("run_coro_threadsafe called from the loop's own thread; await the coroutine")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    done, _ = concurrent.futures.wait([future], timeout)
    if not done:
        future.cancel()
        raise EventLoopBlocked(
            f"event loop did not finish the call within {timeout} s "
            f"(called from thread {threading.current_thread().name})"
        )
    return future.result()


def _running_loop_in_this_thread() -> asyncio.AbstractEventLoop | None:
    """The loop running in the calling thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
