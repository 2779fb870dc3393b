"""Continuous batching in the scheduler: requests join a running batch at the next step and leave
when done, and each one's greedy output equals its output alone."""

from __future__ import annotations

import asyncio

import pytest

from ling.checkpoint import load_checkpoint
from ling.infer.generate import generate_tokens
from ling.serve.metrics import Metrics
from ling.serve.runner import BatchRunner, SamplingParams, Sequence
from ling.serve.scheduler import QueueFull, Scheduler
from tests.serving import make_checkpoint


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    return load_checkpoint(make_checkpoint(tmp_path_factory.mktemp("batching") / "ckpt"))


def greedy(prompt, max_tokens):
    return Sequence(prompt=prompt, params=SamplingParams(max_tokens=max_tokens, temperature=0))


async def drain(submission):
    return [event async for _, event in submission]


def test_requests_join_the_running_batch_and_leave_when_done(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    scheduler = Scheduler(BatchRunner(model, tokenizer, max_batch_size=3, max_len=128), max_queue=8, metrics=Metrics())
    prompts = {"a": [5, 9, 2, 7], "b": list(range(40, 70)), "c": [3]}
    lengths = {"a": 6, "b": 12, "c": 9}
    batch_sizes = []

    async def run():
        subs = {"a": scheduler.submit([greedy(prompts["a"], lengths["a"])])}
        for _ in range(3):  # a decodes alone
            scheduler.step()
            batch_sizes.append(len(scheduler.runner.rows))
        subs["b"] = scheduler.submit([greedy(prompts["b"], lengths["b"])])
        subs["c"] = scheduler.submit([greedy(prompts["c"], lengths["c"])])
        while scheduler.running or scheduler.waiting:
            scheduler.step()
            batch_sizes.append(len(scheduler.runner.rows))
        return {k: await drain(s) for k, s in subs.items()}

    events = asyncio.run(run())
    # a: 1 token from prefill + 3 alone; then b and c join at the next step; a leaves first (after 6 tokens).
    assert batch_sizes[:4] == [1, 1, 1, 3]
    assert batch_sizes[-1] == 0 and max(batch_sizes) == 3
    for key, evs in events.items():
        expected = list(generate_tokens(model, prompts[key], lengths[key], temperature=0))
        text = "".join(e.text for e in evs)
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
        assert (evs[-1].finish_reason, evs[-1].completion_tokens) == ("length", lengths[key])


def test_waiting_requests_beyond_the_queue_bound_are_refused(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    scheduler = Scheduler(BatchRunner(model, tokenizer, max_batch_size=1, max_len=128), max_queue=2, metrics=Metrics())

    async def run():
        scheduler.submit([greedy([1, 2], 3)])
        scheduler.submit([greedy([1, 2], 3)])
        with pytest.raises(QueueFull):
            scheduler.submit([greedy([1, 2], 3)])
        scheduler.step()  # one is admitted: a place in the queue frees up
        scheduler.submit([greedy([1, 2], 3)])
        with pytest.raises(QueueFull):
            scheduler.submit([greedy([1, 2], 3)])

    asyncio.run(run())


def test_cancelled_sequences_leave_at_the_next_step(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    scheduler = Scheduler(BatchRunner(model, tokenizer, max_batch_size=2, max_len=128), max_queue=4, metrics=Metrics())

    async def run():
        running = scheduler.submit([greedy([1, 2], 50), greedy([3, 4], 50)])
        queued = scheduler.submit([greedy([5], 50)])
        scheduler.step()
        assert len(scheduler.runner.rows) == 2 and len(scheduler.waiting) == 1
        running.handles[0].cancelled = True
        queued.cancel()
        scheduler.step()
        assert [s.prompt for s in scheduler.runner.rows] == [[3, 4]] and not scheduler.waiting
        running.cancel()
        scheduler.step()
        assert not scheduler.runner.rows and not scheduler.running
        return [event async for event in running], await drain(queued)

    running_events, queued_events = asyncio.run(run())
    last = {index: event for index, event in running_events}
    assert last[0].finish_reason == last[1].finish_reason == "cancelled"
    assert last[0].completion_tokens == 2 < last[1].completion_tokens == 3
    assert [e.finish_reason for e in queued_events] == ["cancelled"]
