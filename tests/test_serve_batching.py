"""Continuous batching in the scheduler: requests join a running batch at the next step and leave
when done, and each one's greedy output equals its output alone."""

from __future__ import annotations

import asyncio

import pytest

from ling.checkpoint import load_checkpoint
from ling.infer import Engine, SamplingParams
from ling.infer.generate import generate_tokens
from ling.serve.metrics import Metrics
from ling.serve.scheduler import QueueFull, Scheduler
from tests.serving import make_checkpoint


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    return load_checkpoint(make_checkpoint(tmp_path_factory.mktemp("batching") / "ckpt"))


def scheduler_for(model_and_tokenizer, max_batch_size, max_queue):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_len=128)
    return Scheduler(engine, max_queue=max_queue, metrics=Metrics())


def greedy(prompt, max_tokens):
    return prompt, SamplingParams(max_new_tokens=max_tokens, temperature=0)


async def events_of(submission):
    return [event async for event in submission]


def test_requests_join_the_running_batch_and_leave_when_done(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    scheduler = scheduler_for(model_and_tokenizer, max_batch_size=3, max_queue=8)
    prompts = {"a": [5, 9, 2, 7], "b": list(range(40, 70)), "c": [3]}
    lengths = {"a": 6, "b": 12, "c": 9}
    batch_sizes = []

    async def run():
        subs = {"a": scheduler.submit([greedy(prompts["a"], lengths["a"])])}
        for _ in range(3):  # a decodes alone
            scheduler.step()
            batch_sizes.append(scheduler.running)
        subs["b"] = scheduler.submit([greedy(prompts["b"], lengths["b"])])
        subs["c"] = scheduler.submit([greedy(prompts["c"], lengths["c"])])
        while scheduler.engine.has_work():
            scheduler.step()
            batch_sizes.append(scheduler.running)
        return {k: await events_of(s) for k, s in subs.items()}

    events = asyncio.run(run())
    # a runs alone; b and c join at the next step; a leaves first, then c, then b.
    assert batch_sizes[:4] == [1, 1, 1, 3]
    assert batch_sizes[-1] == 0 and sorted(set(batch_sizes)) == [0, 1, 2, 3]
    for key, evs in events.items():
        expected = list(generate_tokens(model, prompts[key], lengths[key], temperature=0))
        assert "".join(e.text for _, e in evs) == tokenizer.decode(expected, skip_special_tokens=True)
        assert (evs[-1][1].finish_reason, evs[-1][1].completion_tokens) == ("length", lengths[key])


def test_waiting_sequences_beyond_the_queue_bound_are_refused(model_and_tokenizer):
    scheduler = scheduler_for(model_and_tokenizer, max_batch_size=1, max_queue=2)

    async def run():
        scheduler.submit([greedy([1, 2], 3)])
        scheduler.submit([greedy([1, 2], 3)])
        with pytest.raises(QueueFull):
            scheduler.submit([greedy([1, 2], 3)])
        scheduler.step()  # one is admitted: a place in the queue frees up
        scheduler.submit([greedy([1, 2], 3)])
        with pytest.raises(QueueFull):
            scheduler.submit([greedy([1, 2], 3)])
        with pytest.raises(QueueFull):  # all or nothing: n sequences need n places
            scheduler.submit([greedy([1, 2], 3)] * 3)

    asyncio.run(run())


def test_cancelled_sequences_leave_at_the_next_step(model_and_tokenizer):
    scheduler = scheduler_for(model_and_tokenizer, max_batch_size=2, max_queue=4)

    async def run():
        running = scheduler.submit([greedy([1, 2], 50), greedy([3, 4], 50)])
        queued = scheduler.submit([greedy([5], 50)])
        scheduler.step()
        assert (scheduler.running, scheduler.waiting) == (2, 1)
        scheduler.abort(running.handles[:1])
        queued.cancel()
        scheduler.step()
        assert (scheduler.running, scheduler.waiting) == (1, 0)
        running.cancel()
        scheduler.step()
        assert (scheduler.running, scheduler.waiting) == (0, 0) and not scheduler.handles
        return await events_of(running), await events_of(queued)

    running_events, queued_events = asyncio.run(run())
    last = dict(running_events)
    assert last[0].finish_reason == last[1].finish_reason == "abort"
    assert last[0].completion_tokens == 1 < last[1].completion_tokens == 2  # prefill, then one decode step
    assert [e.finish_reason for _, e in queued_events] == ["abort"]
