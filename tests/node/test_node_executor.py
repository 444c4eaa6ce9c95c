"""The thread/loop seam: inference off the loop, timing, emulation stretch, shutdown, cross-thread calls."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping

import numpy as np
import pytest

from fleetpipe.errors import InferenceError
from fleetpipe.node.executor import EventLoopBlocked, InferenceExecutor, run_coro_threadsafe
from fleetpipe.node.runtime import TensorSpec, create_runtime
from fleetpipe.node.runtime.fake import fake_model_bytes, fake_reference

X = np.ones((2, 4), np.float32)


def _fake(sleep_ms: float = 0.0):
    runtime = create_runtime("fake")
    runtime.load(fake_model_bytes(4, 3, sleep_ms=sleep_ms))
    return runtime


class _Recording:
    """Wraps a runtime and records the thread each run happens on."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.threads: list[str] = []

    def load(self, model_bytes: bytes) -> None:
        self.inner.load(model_bytes)

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self.inner.input_specs()

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return self.inner.output_specs()

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.append(threading.current_thread().name)
        return self.inner.run(inputs)


def test_runs_off_the_loop_thread_and_measures_compute() -> None:
    runtime = _Recording(_fake(sleep_ms=20))

    async def main() -> tuple[dict[str, np.ndarray], float, str]:
        with InferenceExecutor(runtime) as executor:
            outputs, compute_ms = await executor.run({"x": X})
            return outputs, compute_ms, threading.current_thread().name

    outputs, compute_ms, loop_thread = asyncio.run(main())
    assert runtime.threads and runtime.threads[0].startswith("fleetpipe-infer")
    assert runtime.threads[0] != loop_thread
    np.testing.assert_array_equal(outputs["y"], fake_reference(fake_model_bytes(4, 3), X))
    assert 18.0 <= compute_ms < 200.0


def test_loop_stays_responsive_while_inference_runs() -> None:
    async def main() -> int:
        ticks = 0
        with InferenceExecutor(_fake(sleep_ms=150)) as executor:
            task = asyncio.create_task(executor.run({"x": X}))
            while not task.done():
                await asyncio.sleep(0.01)
                ticks += 1
            await task
        return ticks

    assert asyncio.run(main()) >= 5


def test_stretch_makes_wall_time_factor_times_compute() -> None:
    factor = 3.0

    async def main() -> tuple[float, float, float]:
        with InferenceExecutor(_fake(sleep_ms=40), compute_factor=factor) as executor:
            start = time.perf_counter()
            _, compute_ms = await executor.run({"x": X})
            wall_ms = (time.perf_counter() - start) * 1e3
            return compute_ms, executor.last_real_ms, wall_ms

    compute_ms, real_ms, wall_ms = asyncio.run(main())
    assert real_ms >= 39.0
    assert compute_ms == pytest.approx(factor * real_ms, rel=0.10)
    assert wall_ms >= 0.95 * factor * real_ms
    assert wall_ms < factor * real_ms + 100.0


class _ColdAfterIdle:
    """A single-threaded runtime burning 8 ms of CPU per run, 40 ms when it ran last over 20 ms ago."""

    threads = 1

    def __init__(self, inner) -> None:
        self.inner = inner
        self.last = 0.0
        self.runs = 0

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self.inner.input_specs()

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return self.inner.output_specs()

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cold = time.perf_counter() - self.last > 0.02
        end = time.thread_time() + (0.040 if cold else 0.008)
        while time.thread_time() < end:
            pass
        self.last = time.perf_counter()
        self.runs += 1
        return self.inner.run(inputs)


@pytest.mark.parametrize("warm", [True, False])
def test_emulation_times_a_warm_run_after_idle(warm: bool) -> None:
    """An emulating worker idle before a run (its stretch sleep) times a second, warm pass: the host's
    cold caches after idling are not multiplied by the factor. Without it the cold run is what counts."""
    factor = 10.0  # 10 x 8 ms of warm work leaves a stretch sleep of > 20 ms after the 48 ms of two passes
    runtime = _ColdAfterIdle(_fake())

    async def main() -> tuple[list[float], list[dict[str, np.ndarray]], int]:
        with InferenceExecutor(runtime, compute_factor=factor, warm_rerun=warm) as executor:
            runs = [await executor.run({"x": X}) for _ in range(3)]
            return [ms for _, ms in runs], [out for out, _ in runs], executor.warm_reruns

    busy, outs, reruns = asyncio.run(main())
    ref = fake_reference(fake_model_bytes(4, 3), X)
    for out in outs:
        (got,) = out.values()
        np.testing.assert_allclose(got, ref)
    if warm:
        assert reruns == 3 and runtime.runs == 6  # every run follows a stretch sleep of >= 24 ms
        assert all(factor * 7.0 <= ms < factor * 20.0 for ms in busy), busy
    else:
        assert reruns == 0 and runtime.runs == 3
        assert all(ms >= factor * 38.0 for ms in busy), busy


def test_frames_run_one_at_a_time_in_order() -> None:
    runtime = _fake(sleep_ms=15)

    async def main() -> tuple[list[float], int]:
        with InferenceExecutor(runtime) as executor:
            start = time.perf_counter()
            tasks = [asyncio.create_task(executor.run({"x": X * i})) for i in range(4)]
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            depth = executor.pending
            results = await asyncio.gather(*tasks)
            assert executor.pending == 0
            return [(time.perf_counter() - start) * 1e3, *(ms for _, ms in results)], depth

    timings, depth = asyncio.run(main())
    assert depth == 4
    assert timings[0] >= 4 * 15 * 0.95  # serialised on one worker


def test_inference_errors_reach_the_awaiting_task() -> None:
    class Broken(_Recording):
        def run(self, inputs):
            raise ZeroDivisionError("boom")

    async def main() -> None:
        with InferenceExecutor(_fake()) as executor, pytest.raises(InferenceError, match="'x' has shape"):
            await executor.run({"x": np.ones((2, 5), np.float32)})
        with InferenceExecutor(Broken(_fake())) as executor:
            with pytest.raises(InferenceError, match="boom") as info:
                await executor.run({"x": X})
            assert isinstance(info.value.__cause__, ZeroDivisionError)

    asyncio.run(main())


def test_shutdown_leaves_no_threads_and_rejects_work() -> None:
    async def main() -> None:
        executor = InferenceExecutor(_fake())
        await executor.run({"x": X})
        executor.shutdown()
        with pytest.raises(InferenceError, match="shut down"):
            await executor.run({"x": X})

    asyncio.run(main())
    assert not [t for t in threading.enumerate() if t.name.startswith("fleetpipe-infer")]


def test_shutdown_drops_queued_frames_as_inference_errors() -> None:
    async def main() -> list[object]:
        executor = InferenceExecutor(_fake(sleep_ms=50))
        tasks = [asyncio.create_task(executor.run({"x": X})) for _ in range(3)]
        await asyncio.sleep(0.01)
        executor.shutdown(wait=False)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        executor.shutdown()
        return results

    results = asyncio.run(main())
    assert isinstance(results[0], tuple)
    assert all(isinstance(r, InferenceError) for r in results[1:])


def test_executor_rejects_speedup_factor() -> None:
    with pytest.raises(ValueError):
        InferenceExecutor(_fake(), compute_factor=0.5)


def test_run_coro_threadsafe_result_and_timeout() -> None:
    async def value() -> int:
        return 42

    async def slow() -> None:
        await asyncio.sleep(5)

    async def raises() -> None:
        raise TimeoutError("inner")

    async def main() -> tuple[int, BaseException | None, BaseException | None]:
        loop = asyncio.get_running_loop()
        got = await asyncio.to_thread(run_coro_threadsafe, value(), loop, 1.0)

        def capture(coro) -> BaseException | None:
            try:
                run_coro_threadsafe(coro, loop, 0.05)
            except BaseException as exc:
                return exc
            return None

        blocked = await asyncio.to_thread(capture, slow())
        inner = await asyncio.to_thread(capture, raises())
        with pytest.raises(RuntimeError, match="own thread"):
            run_coro_threadsafe(value(), loop, 1.0)
        return got, blocked, inner

    got, blocked, inner = asyncio.run(main())
    assert got == 42
    assert isinstance(blocked, EventLoopBlocked)
    assert isinstance(inner, TimeoutError) and str(inner) == "inner"


def test_other_runtimes_run_on_the_same_single_worker_thread() -> None:
    """A split stage's unit and part slices share the node's one inference thread."""
    first, second = _Recording(_fake()), _Recording(_fake())

    async def main() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        with InferenceExecutor(first) as ex:
            a, _ = await ex.run({"x": X})
            b, _ = await ex.run({"x": X}, second)
            return a, b

    a, b = asyncio.run(main())
    assert len(first.threads) == len(second.threads) == 1
    assert first.threads == second.threads and first.threads[0] != threading.current_thread().name
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
