"""Continuous batching: one thread runs the model; HTTP handlers submit sequences and read events.

Each iteration of the loop (1) drops sequences whose clients went away, (2) prefills
waiting sequences into free rows — so a request that arrives while others decode joins
the batch at the next step — and (3) runs one decode step for all rows. Finished
sequences leave at once and free their row. Tokens travel to the asyncio side through
`loop.call_soon_threadsafe`, so the event loop never blocks on the model.

The waiting queue is bounded: `submit` raises `QueueFull` rather than letting latency grow
without limit (the app answers 503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass

from ling.serve.metrics import Metrics
from ling.serve.runner import BatchRunner, Sequence, StepOutput

log = logging.getLogger("ling.serve")


class QueueFull(Exception):
    pass


@dataclass
class Event:
    """A piece of one sequence's output, delivered to its request handler."""

    text: str
    logprobs: list
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


class Handle:
    """The scheduler's view of one sequence: where its events go, and whether to stop it."""

    def __init__(self, sequence: Sequence, index: int, submission: "Submission"):
        self.sequence, self.index, self.submission = sequence, index, submission
        self.cancelled = False
        self.last_token_at: float | None = None

    def _deliver(self, event: Event) -> None:
        self.submission.loop.call_soon_threadsafe(self.submission.events.put_nowait, (self.index, event))


class Submission:
    """The request side: the events of all its sequences as one async stream of (index, Event)."""

    def __init__(self, sequences: list[Sequence], loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.handles = [Handle(s, i, self) for i, s in enumerate(sequences)]
        self.submitted_at = time.perf_counter()

    def cancel(self) -> None:
        """Stop generating (the client went away); the scheduler frees the rows at its next step."""
        for handle in self.handles:
            handle.cancelled = True

    async def __aiter__(self):
        open_ = len(self.handles)
        while open_:
            index, event = await self.events.get()
            yield index, event
            if event.finish_reason is not None or event.error is not None:
                open_ -= 1


class Scheduler:
    def __init__(self, runner: BatchRunner, max_queue: int, metrics: Metrics):
        self.runner, self.max_queue, self.metrics = runner, max_queue, metrics
        self.waiting: collections.deque[Handle] = collections.deque()
        self.running: dict[Sequence, Handle] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- request side (event loop thread) -------------------------------------------------
    def submit(self, sequences: list[Sequence]) -> Submission:
        """Queue sequences for generation; all or none (QueueFull)."""
        submission = Submission(sequences, asyncio.get_running_loop())
        with self._wake:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"the queue is full ({len(self.waiting)} sequences waiting)")
            self.waiting.extend(submission.handles)
            self.metrics.queue_depth.set(len(self.waiting))
            self._wake.notify()
        return submission

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ling-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Accept no new requests; those in flight go on."""
        with self._wake:
            self._closed = True

    def cancel_all(self) -> None:
        """End every request in flight at the next step (finish_reason "cancelled")."""
        with self._wake:
            for handle in list(self.waiting) + list(self.running.values()):
                handle.cancelled = True
            self._wake.notify()

    def stop(self) -> None:
        """Cancel what is left and end the model thread."""
        self.close()
        self.cancel_all()
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # ---- the model thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self.waiting and not self.running and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self.waiting and not self.running:
                    return
            try:
                self.step()
            except Exception as e:  # a model failure fails the requests in flight, not the server
                log.exception("generation step failed")
                with self._wake:
                    failed = list(self.running.values()) + list(self.waiting)
                    self.waiting.clear()
                for handle in failed:
                    self._finish(handle, Event("", [], error=f"generation failed: {e}"))

    def step(self) -> None:
        """One scheduling iteration: drop cancelled, admit waiting, decode one token for all."""
        for handle in [h for h in self.running.values() if h.cancelled]:
            self._finish(handle, Event("", [], finish_reason="cancelled"))
        admitted = []
        with self._wake:
            for handle in [h for h in self.waiting if h.cancelled]:
                self.waiting.remove(handle)
                self._finish(handle, Event("", [], finish_reason="cancelled"))
            while self.waiting and self.runner.free_slots > len(admitted):
                admitted.append(self.waiting.popleft())
            self.metrics.queue_depth.set(len(self.waiting))
        for handle in admitted:
            self.running[handle.sequence] = handle
            self.metrics.prompt_tokens.inc(len(handle.sequence.prompt))
            self._publish(self.runner.add(handle.sequence))
        if self.runner.rows:
            self.metrics.batch_size.observe(len(self.runner.rows))
            for output in self.runner.step():
                self._publish(output)
        self.metrics.running.set(len(self.runner.rows))

    def _publish(self, output: StepOutput) -> None:
        handle = self.running[output.sequence]
        now = time.perf_counter()
        if handle.last_token_at is None:
            self.metrics.time_to_first_token.observe(now - handle.submission.submitted_at)
        else:
            self.metrics.time_per_output_token.observe(now - handle.last_token_at)
        handle.last_token_at = now
        self.metrics.generation_tokens.inc()
        event = Event(output.text, output.logprobs, output.finish_reason)
        if output.finish_reason is not None:
            self._finish(handle, event)
        else:
            handle._deliver(event)

    def _finish(self, handle: Handle, event: Event) -> None:
        seq = handle.sequence
        if seq in self.runner.rows:
            self.runner.remove(seq)
        self.running.pop(seq, None)
        event.completion_tokens = len(seq.generated)
        handle._deliver(event)
        self.metrics.finished.labels(reason=event.finish_reason or "error").inc()
