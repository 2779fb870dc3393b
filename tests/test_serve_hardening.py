"""One bad request never harms another: sampling parameters at the edge of float32, a request whose
own step fails, and the inputs that used to give a 500 (deep JSON, huge integers, lone surrogates,
loose types, a stalled body, a long prompt tokenised on the event loop)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import httpx
import pytest
import torch

from ling.checkpoint import load_checkpoint
from ling.infer import Engine, SamplingParams
from ling.infer.sampling import MIN_TOP_P, BatchSampler
from ling.serve.metrics import Metrics
from ling.serve.scheduler import Scheduler
from ling.serve.server import ServeArgs
from tests.serving import live_server, make_checkpoint

POISON_SEED = 666
"""requests with this seed get NaN scores from `poison` (a request whose own step fails)"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("hardening") / "tiny-chat", context_length=512)


@pytest.fixture(scope="module")
def model_and_tokenizer(ckpt):
    return load_checkpoint(ckpt)


@pytest.fixture(scope="module")
def server(ckpt):
    with live_server(ServeArgs(ckpt=str(ckpt), max_batch_size=8, body_timeout=1.0)) as (url, state):
        yield url, state


def poison(sampler: BatchSampler) -> None:
    """Make the rows of POISON_SEED requests score NaN, as a model's overflow would."""
    original = sampler.filtered_logits

    def filtered_logits(logits, start):
        scores = original(logits, start).clone()
        for row, params in enumerate(sampler.params[start : start + logits.shape[0]]):
            if params is not None and params.seed == POISON_SEED:
                scores[row] = float("nan")
        return scores

    sampler.filtered_logits = filtered_logits


# ---- sampling parameters at the edge -----------------------------------------------------------
@pytest.mark.parametrize("tiny", [dict(temperature=1e-300), dict(temperature=5e-324), dict(top_p=1e-300),
                                  dict(top_p=5e-324), dict(temperature=1e-300, top_p=5e-324)])
def test_a_tiny_temperature_or_top_p_is_greedy(tiny):
    params = SamplingParams(**tiny, seed=1)
    assert params.greedy
    logits = torch.tensor([[0.5, 3.0, 2.9, -1.0]])
    sampler = BatchSampler(1, vocab_size=4)
    sampler.set_slot(0, params, [0])
    tokens, _, errors = sampler.sample(logits, 0)
    assert (int(tokens[0]), errors) == (1, {})


@pytest.mark.parametrize("top_p", [MIN_TOP_P, 1e-3, 0.01])
def test_top_p_always_keeps_the_most_likely_token(top_p):
    sampler = BatchSampler(1, vocab_size=4)
    sampler.set_slot(0, SamplingParams(top_p=top_p, top_k=0, seed=0), [0])
    scores = sampler.filtered_logits(torch.tensor([[0.5, 3.0, 2.9, -1.0]]), 0)
    assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [1]


@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(temperature=float("inf")),
                                 dict(top_p=float("nan")), dict(repetition_penalty=float("inf")),
                                 dict(presence_penalty=float("nan")), dict(seed=2**64)])
def test_non_finite_or_out_of_range_parameters_are_refused(bad):
    from ling.errors import LingError

    with pytest.raises(LingError, match="invalid sampling parameter"):
        SamplingParams(**bad)


def test_a_row_that_cannot_be_sampled_is_reported_and_the_others_sample():
    sampler = BatchSampler(2, vocab_size=4)
    sampler.set_slot(0, SamplingParams(seed=1), [0])
    sampler.set_slot(1, SamplingParams(seed=2), [0])
    logits = torch.tensor([[float("nan")] * 4, [0.0, 0.0, 9.0, 0.0]])
    tokens, _, errors = sampler.sample(logits, 0)
    assert list(errors) == [0] and "not finite" in errors[0]
    assert int(tokens[1]) == 2


# ---- a request's failure stays its own -----------------------------------------------------------
def test_a_failing_sequence_ends_alone_and_its_batch_mates_finish_as_if_nothing_happened(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [[5, 9, 2], [7, 7, 1, 4], [3], [11, 12]]
    params = [SamplingParams(max_new_tokens=10, temperature=0.8, seed=i) for i in range(4)]
    alone = Engine(model, tokenizer, max_batch_size=4).generate(prompts, params)

    engine = Engine(model, tokenizer, max_batch_size=5)
    poison(engine.sampler)
    bad = SamplingParams(max_new_tokens=10, temperature=0.8, seed=POISON_SEED)
    together = engine.generate(prompts[:2] + [[1, 2, 3]] + prompts[2:], params[:2] + [bad] + params[2:])
    failed = together.pop(2)
    assert failed.finish_reason == "error" and "not finite" in failed.error
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.finish_reason for c in together] == ["length"] * 4
    assert engine.num_running() == 0 and not engine.has_work()


def test_the_scheduler_fails_only_the_sequence_whose_step_failed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch_size=5)
    poison(engine.sampler)
    scheduler = Scheduler(engine, max_queue=8, metrics=Metrics())

    async def run():
        four = scheduler.submit([([5, 9, 2], SamplingParams(max_new_tokens=8, temperature=1.0, seed=i))
                                 for i in range(4)])
        bad = scheduler.submit([([1, 2], SamplingParams(max_new_tokens=8, temperature=1.0, seed=POISON_SEED))])
        while engine.has_work():
            scheduler.step()
        return [e async for e in four], [e async for e in bad]

    four, bad = asyncio.run(run())
    assert [e.error for _, e in bad] == ["generation failed: the model's scores for this sequence are not finite (NaN)"]
    assert all(e.error is None for _, e in four)
    assert sorted(i for i, e in four if e.finish_reason == "length") == [0, 1, 2, 3]


def test_a_tiny_temperature_beside_a_streamed_four_choice_request(server):
    """The reported failure: temperature / top_p 1e-300 turned every choice of a concurrent
    4-choice stream into error events."""
    url, _ = server
    results = {}

    def stream():
        body = {"prompt": "First Citizen", "max_tokens": 400, "n": 4, "stream": True, "seed": 3}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            results["stream"] = [json.loads(line[6:]) for line in r.iter_lines()
                                 if line.startswith("data: ") and line != "data: [DONE]"]

    thread = threading.Thread(target=stream)
    thread.start()
    tiny = [httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 8, **p}, timeout=60)
            for p in ({"temperature": 1e-300}, {"top_p": 1e-300}, {"top_p": 5e-324})]
    greedy = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 8, "temperature": 0}, timeout=60)
    thread.join()
    assert [r.status_code for r in tiny] == [200, 200, 200]
    assert {r.json()["choices"][0]["text"] for r in tiny} == {greedy.json()["choices"][0]["text"]}
    chunks = results["stream"]
    assert not [c for c in chunks if "error" in c]
    assert sorted(ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"]) == [0, 1, 2, 3]


def test_a_failing_request_in_flight_does_not_touch_a_concurrent_stream(server):
    url, state = server
    poison(state.scheduler.engine.sampler)
    try:
        body = {"prompt": "First Citizen", "max_tokens": 400, "n": 4, "stream": True, "seed": 3}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            bad = httpx.post(url + "/v1/completions", timeout=60,
                             json={"prompt": "Hi", "max_tokens": 8, "seed": POISON_SEED})
            rest = [first] + [line for line in lines if line.startswith("data: ")]
    finally:
        del state.scheduler.engine.sampler.filtered_logits  # back to the class's method
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
    chunks = [json.loads(line[6:]) for line in rest if line != "data: [DONE]"]
    assert not [c for c in chunks if "error" in c]
    assert sorted(ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"]) == [0, 1, 2, 3]
    assert rest[-1] == "data: [DONE]"


# ---- no 500s -------------------------------------------------------------------------------------
def post_raw(url, raw: bytes, path="/v1/completions"):
    return httpx.post(url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=30)


def assert_openai_error(r, status: int, param=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    return error


@pytest.mark.parametrize("raw", [
    b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}",
    b'{"prompt": "\\ud800"}',
    b'{"prompt": "a\\udfffb"}',
    b'{"prompt": "hi", "temperature": NaN}',
])
def test_bodies_python_json_choked_on_are_a_400(server, raw):
    error = assert_openai_error(post_raw(server[0], raw), 400, param=None if b"NaN" not in raw else "temperature")
    assert error["code"] == ("invalid_json" if b"NaN" not in raw else "invalid_value")


def test_a_lone_surrogate_in_a_chat_message_is_a_400(server):
    raw = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
    assert_openai_error(post_raw(server[0], raw, "/v1/chat/completions"), 400)


def test_a_lone_surrogate_given_to_the_engine_is_a_clear_error(model_and_tokenizer):
    from ling.errors import LingError

    model, tokenizer = model_and_tokenizer
    with pytest.raises(LingError, match=r"not valid Unicode: a lone surrogate '\\ud800' at character 2"):
        Engine(model, tokenizer).add_request("hi\ud800")


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": [[False]]}, "prompt"),
    ({"prompt": [1.0, 2.0]}, "prompt"),
    ({"prompt": "hi", "n": "2"}, "n"),
    ({"prompt": "hi", "temperature": "0.5"}, "temperature"),
    ({"prompt": "hi", "logprobs": True}, "logprobs"),
])
def test_loose_types_are_refused(server, body, param):
    error = assert_openai_error(httpx.post(server[0] + "/v1/completions", json=body, timeout=30), 400, param)
    assert error["message"].startswith(param + ": ")


def test_an_integer_given_for_a_float_is_fine(server):
    r = httpx.post(server[0] + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0}, timeout=30)
    assert r.status_code == 200


def test_a_stalled_body_is_timed_out(server):
    url, state = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert httpx.get(url + "/health").status_code == 200


def test_a_long_prompt_is_tokenised_off_the_event_loop(server):
    """While one request's prompt is being tokenised, the server answers others."""
    url, state = server
    tokenizer = state.tokenizer
    entered, release = threading.Event(), threading.Event()
    original = tokenizer.encode

    def slow_encode(text, *args, **kwargs):
        if text.startswith("LONG"):
            entered.set()
            release.wait(30)
        return original(text, *args, **kwargs)

    tokenizer.encode = slow_encode
    result = {}
    try:
        prompt = "LONG " + "speak " * 150_000  # 900 kB: within the body limit, far beyond the context
        thread = threading.Thread(target=lambda: result.update(r=httpx.post(
            url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=60)))
        thread.start()
        assert entered.wait(30)
        health = httpx.get(url + "/health", timeout=10)  # would time out if tokenising blocked the loop
        assert health.status_code == 200 and not release.is_set()
    finally:
        release.set()
        thread.join()
        del tokenizer.encode
    assert result["r"].status_code == 400  # far beyond the context: refused, after tokenising
    assert result["r"].json()["error"]["code"] == "context_length_exceeded"


def test_the_openapi_schema_and_docs_are_served(server):
    url, _ = server
    schema = httpx.get(url + "/openapi.json").json()
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    components = schema["components"]["schemas"]
    assert {"ChatRequest", "CompletionRequest", "Message", "ErrorResponse"} <= set(components)
    assert "max_tokens" in components["CompletionRequest"]["properties"]
    docs = httpx.get(url + "/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
