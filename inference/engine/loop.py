"""One thread that steps the engine while there is work, serving callers from any thread.

Callers (Celery tasks, `LLM.generate`, several `LLM.stream` iterators at once) submit
sequences and read their StreamEvents from a queue of their own (`submit`), or, when they want
whole results only, wait once for all of them to finish (`submit_all`); the loop thread is the only
one that touches the engine, so every request that is in flight at a step shares that step's
batch. When a step fails, every unfinished request receives the exception (nobody hangs) and
the loop carries on with new requests.

The loop thread also builds the engine (loads the weights, allocates the cache). On a CPU this
matters for speed: PyTorch's OpenMP runtime (libgomp) keeps one worker pool per thread that
runs parallel operations, and once there are more pooled threads than cores it stops letting
idle workers spin, which made every small operation of a decode step wait for a wake-up (a
batch-of-one step took twice as long when the weights had been loaded by another thread). So
the thread that steps the engine is the only one that ever runs the model's operations.
Live loops are closed at interpreter exit, so a daemon thread is never cut off mid-step.

`submit_all` exists for the same reason: a caller waiting on per-token events is woken at every
step, and on two cores each wake-up of another Python thread (a batch worker's feeders) preempts
one of the step's OpenMP threads, whose barrier then waits for it. A `generate` caller needs no
event before the last one, so it is woken once.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable

from .llm_engine import LLMEngine
from .sequence import Sequence

logger = logging.getLogger("inference.engine")

LOG_INTERVAL_SECONDS = 10.0


class EngineFailure(RuntimeError):
    """The engine failed while serving this request (the cause is chained)."""


_LIVE_LOOPS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_loops() -> None:
    for loop in list(_LIVE_LOOPS):
        loop.close(wait=True)


class _AllFinished:
    """The outbox of a `submit_all` group: counts its sequences' final events and puts one None on
    `queue` after the last; exceptions pass straight through. Only the loop thread calls `put`."""

    def __init__(self, count: int):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self._remaining = count

    def put(self, item) -> None:
        if isinstance(item, BaseException):
            self.queue.put(item)
        elif item.finish_reason is not None:
            self._remaining -= 1
            if self._remaining == 0:
                self.queue.put(None)


class EngineLoop:
    """Starts the loop thread, which calls `build()` to make the engine, then serves requests.

    The constructor returns once the engine is built, raising what `build` raised.
    """

    def __init__(self, build: Callable[[], LLMEngine], name: str = "citadel-engine"):
        self.engine: LLMEngine | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outboxes: dict[str, queue.SimpleQueue] = {}
        self._stats_lock = threading.Lock()
        self._closed = False
        self._last_log = time.monotonic()
        self._logged_steps = 0
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(build,), name=name, daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            self._closed = True
            raise self._build_error
        _LIVE_LOOPS.add(self)

    def submit(self, seq: Sequence) -> queue.SimpleQueue:
        """Queue `seq`; its StreamEvents (or an exception) arrive on the returned queue."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox.put(("add", seq, outbox))
        return outbox

    def submit_all(self, seqs: list[Sequence]) -> queue.SimpleQueue:
        """Queue `seqs` together; the returned queue receives None once every one has finished (read
        the results from the sequences), or an exception that failed them, and nothing per token."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        group = _AllFinished(len(seqs))
        if not seqs:
            group.queue.put(None)
        for seq in seqs:
            self._inbox.put(("add", seq, group))
        return group.queue

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))

    def stats(self) -> dict:
        with self._stats_lock:
            stats = self.engine.stats.as_dict()
            stats["running"] = len(self.engine.scheduler.running)
            stats["waiting"] = len(self.engine.scheduler.waiting)
            stats["kv_pages_total"] = self.engine.runner.block_manager.num_pages - 1
            stats["kv_pages_free"] = self.engine.runner.block_manager.num_free_pages
            stats.update(self.engine.lora.stats())
            experts = getattr(self.engine.runner.model, "expert_store", None)
            if experts is not None:
                stats.update(experts.stats())
            if self.engine.runner.tiers is not None:
                stats.update(self.engine.runner.tiers.stats())
            if self.engine.runner.block_manager.prefix is not None:
                stats.update(self.engine.runner.block_manager.prefix.stats())
        return stats

    def close(self, wait: bool = True) -> None:
        """Stop the loop thread; requests still in flight receive EngineFailure.

        With `wait`, return once the thread has ended, even if an earlier close() did not wait
        (LLM.__del__ cannot: the interpreter must not exit while the thread still runs C++ code).
        """
        if not self._closed:
            self._closed = True
            self._inbox.put(("close", None, None))
        if wait and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # -- the loop thread -----------------------------------------------------------------------

    def _main(self, build: Callable[[], LLMEngine]) -> None:
        try:
            self.engine = build()
        except BaseException as error:  # handed to the constructor, which raises it
            self._build_error = error
            return
        finally:
            self._built.set()
        self._run()

    def _run(self) -> None:
        while True:
            # Sleep until something arrives when idle; otherwise take what is there and step.
            block = not self.engine.has_unfinished()
            try:
                message = self._inbox.get(block=block)
            except queue.Empty:
                message = None
            while message is not None:
                if message[0] == "close":
                    self._fail_everything(EngineFailure("the engine was closed"))
                    return
                self._handle(message)
                try:
                    message = self._inbox.get_nowait()
                except queue.Empty:
                    message = None
            if not self.engine.has_unfinished():
                continue
            try:
                with self._stats_lock:
                    events = self.engine.step()
            except Exception as error:
                logger.exception("engine step failed; failing the requests in flight")
                self._fail_everything(error)
                continue
            for seq, event in events:
                outbox = self._outboxes.get(seq.request_id)
                if outbox is not None:
                    outbox.put(event)
                    if event.finish_reason is not None:
                        del self._outboxes[seq.request_id]
            self._maybe_log()

    def _handle(self, message) -> None:
        kind, payload, outbox = message
        if kind == "add":
            try:
                with self._stats_lock:
                    self.engine.add_request(payload)
            except Exception as error:  # a request the engine refuses must not take the loop down
                outbox.put(error)
                return
            self._outboxes[payload.request_id] = outbox
        elif kind == "abort":
            self._outboxes.pop(payload, None)
            with self._stats_lock:
                self.engine.abort(payload)

    def _fail_everything(self, error: BaseException) -> None:
        with self._stats_lock:
            self.engine.fail_all()
        for outbox in self._outboxes.values():
            outbox.put(error)
        self._outboxes.clear()

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < LOG_INTERVAL_SECONDS:
            return
        stats = self.engine.stats
        steps = stats.steps - self._logged_steps
        logger.info(
            "engine: %d steps in %.0fs, batch size last %d max %d mean %.1f, running %d, waiting %d, "
            "preemptions %d, free KV pages %d",
            steps,
            now - self._last_log,
            stats.last_batch_size,
            stats.max_batch_size,
            stats.batch_size_sum / max(stats.steps, 1),
            len(self.engine.scheduler.running),
            len(self.engine.scheduler.waiting),
            stats.preemptions,
            self.engine.runner.block_manager.num_free_pages,
        )
        self._last_log, self._logged_steps = now, stats.steps
