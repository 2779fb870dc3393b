"""Continuous batching for HTTP requests: one thread steps the engine; handlers submit and read.

The engine keeps the running batch (a static KV cache with one row per sequence): each
`step` drops aborted sequences, decodes one token for every running one and prefills
waiting ones into free rows — so a request that arrives while others decode joins the batch
at the next step, and a finished one leaves at once. This module adds what a server needs
around it: a thread that steps while there is work (and sleeps when there is none), a
bounded queue (`QueueFull` → HTTP 503), per-request event streams for the asyncio side
(handed over with one `loop.call_soon_threadsafe` per step, so the event loop never waits on
the model and wakes once per step, not once per token),
cancellation when a client goes away, and the metrics.

Failures: the engine ends a request whose own step fails (finish_reason "error") and the
batch goes on, so that request alone gets an error event. Only when the shared decode step
itself raises are all the requests in flight failed (`_fail_all`): there is no telling then
whose they were.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

from ling.serve.metrics import Metrics

log = logging.getLogger("ling.serve")


class QueueFull(Exception):
    pass


@dataclass
class Event:
    """A piece of one sequence's output, delivered to its request handler."""

    text: str
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    """tokens generated so far (the final count on the last event)"""
    error: str | None = None

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Handle:
    """One sequence of a submission, as the scheduler thread sees it."""

    def __init__(self, submission: "Submission", index: int, request_id: str, prompt_tokens: int):
        self.submission, self.index, self.request_id, self.prompt_tokens = submission, index, request_id, prompt_tokens
        self.generated = 0
        self.last_token_at: float | None = None


class Submission:
    """The request side: the events of all its sequences, as one async stream of (index, Event)."""

    def __init__(self, scheduler: "Scheduler", loop: asyncio.AbstractEventLoop):
        self.scheduler, self.loop = scheduler, loop
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.handles: list[Handle] = []
        self.submitted_at = time.perf_counter()
        self.open = 0

    def cancel(self) -> None:
        """Stop generating (the client went away); the engine frees the rows at its next step."""
        if self.open:
            self.scheduler.abort(self.handles)

    async def __aiter__(self):
        while self.open:
            index, event = await self.events.get()
            if event.last:
                self.open -= 1
            yield index, event

    async def batches(self):
        """Like iterating, but as lists: each one the events that are ready now (at least one) —
        a stream that lags behind the model catches up in fewer, larger writes."""
        while self.open:
            batch = [await self.events.get()]
            while not self.events.empty():
                batch.append(self.events.get_nowait())
            self.open -= sum(event.last for _, event in batch)
            yield batch


def _put_all(items: list[tuple[Submission, tuple[int, Event]]]) -> None:
    for submission, item in items:
        submission.events.put_nowait(item)


class Scheduler:
    def __init__(self, engine, max_queue: int, metrics: Metrics):
        """`engine`: `ling.infer.Engine` (add_request / abort / step / has_work / num_running /
        num_waiting); `max_queue`: most sequences waiting for a row."""
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self.handles: dict[str, Handle] = {}
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._closed = self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- request side (event loop thread) -------------------------------------------------
    def submit(self, requests: list[tuple[list[int], object]]) -> Submission:
        """Queue (prompt ids, sampling params) pairs, all or none (`QueueFull`)."""
        submission = Submission(self, asyncio.get_running_loop())
        with self._wake:
            if self._closed:
                raise QueueFull("the server is shutting down")
            waiting = self.engine.num_waiting()
            if waiting + len(requests) > self.max_queue:
                raise QueueFull(f"{waiting} sequences are waiting already (--max-queue {self.max_queue})")
            try:
                for index, (prompt_ids, params) in enumerate(requests):
                    handle = Handle(submission, index, f"seq-{next(self._ids)}", len(prompt_ids))
                    self.engine.add_request(prompt_ids, params, request_id=handle.request_id)
                    submission.handles.append(handle)
                    self.handles[handle.request_id] = handle
            except Exception:  # the engine refused one: take back those already queued
                for handle in submission.handles:
                    self.engine.abort(handle.request_id)
                    del self.handles[handle.request_id]
                raise
            submission.open = len(requests)
            self.metrics.queue_depth.set(self.engine.num_waiting())
            self._wake.notify()
        return submission

    def abort(self, handles: list[Handle]) -> None:
        with self._wake:
            for handle in handles:
                if handle.request_id in self.handles:
                    self.engine.abort(handle.request_id)
            self._wake.notify()

    @property
    def running(self) -> int:
        return self.engine.num_running()

    @property
    def waiting(self) -> int:
        return self.engine.num_waiting()

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ling-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Accept no new requests; those in flight go on."""
        with self._wake:
            self._closed = True

    def abort_all(self) -> None:
        """End every request in flight at the next step (finish_reason "abort")."""
        self.abort(list(self.handles.values()))

    def stop(self) -> None:
        """Abort what is left and end the engine thread."""
        self.close()
        self.abort_all()
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # ---- the engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self.engine.has_work() and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self.engine.has_work():
                    return
            try:
                self.step()
            except Exception as e:  # a model failure fails the requests in flight, not the server
                log.exception("generation step failed")
                self._fail_all(f"generation failed: {e}")

    def step(self) -> None:
        """One engine step; its deltas go to their requests."""
        running = self.engine.num_running()
        if running:
            self.metrics.batch_size.observe(running)
        deltas = self.engine.step()
        now = time.perf_counter()
        outbox = []
        for delta in deltas:
            handle = self.handles.get(delta.request_id)
            if handle is not None:
                outbox.append((handle.submission, (handle.index, self._route(handle, delta, now))))
        self._send(outbox)
        self.metrics.running.set(self.engine.num_running())
        self.metrics.queue_depth.set(self.engine.num_waiting())

    def _route(self, handle: Handle, delta, now: float) -> Event:
        if delta.token_ids:
            if handle.last_token_at is None:
                self.metrics.prompt_tokens.inc(handle.prompt_tokens)
                self.metrics.time_to_first_token.observe(now - handle.submission.submitted_at)
            else:
                self.metrics.time_per_output_token.observe(now - handle.last_token_at)
            handle.last_token_at = now
            handle.generated += len(delta.token_ids)
            self.metrics.generation_tokens.inc(len(delta.token_ids))
        if delta.finish_reason is not None:
            with self._wake:
                del self.handles[handle.request_id]
            self.metrics.finished.labels(reason=delta.finish_reason).inc()
            if delta.error is not None:
                log.error("sequence %s failed: %s", handle.request_id, delta.error)
                return Event("", finish_reason=None, completion_tokens=handle.generated,
                             error=f"generation failed: {delta.error}")
        return Event(delta.text, delta.logprobs, delta.finish_reason, handle.generated)

    @staticmethod
    def _send(outbox: list[tuple[Submission, tuple[int, Event]]]) -> None:
        """Hand events to the event loop(s) of their requests: one wake-up per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for submission, item in outbox:
            by_loop.setdefault(submission.loop, []).append((submission, item))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _fail_all(self, message: str) -> None:
        with self._wake:
            failed, self.handles = list(self.handles.values()), {}
            for handle in failed:
                self.engine.abort(handle.request_id)
        self._send([(h.submission, (h.index, Event("", error=message, completion_tokens=h.generated)))
                    for h in failed])
        self.metrics.finished.labels(reason="error").inc(len(failed))
