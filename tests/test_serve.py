"""`ling serve` against the official `openai` client (and raw HTTP) on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest

from ling.checkpoint import load_checkpoint
from ling.infer.generate import generate_tokens
from ling.serve.server import ServeArgs
from tests.serving import live_server, make_checkpoint

MAX_LEN = 128


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-chat", context_length=MAX_LEN)


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory):
    """Room for 2000-token answers: a request that holds its row for a good while (~1 s)."""
    return make_checkpoint(tmp_path_factory.mktemp("serve-long") / "tiny-chat", context_length=2048)


@pytest.fixture(scope="module")
def reference(ckpt):
    """Greedy text of the plain single-sequence generator: what the server must reproduce."""
    model, tokenizer = load_checkpoint(ckpt)

    def greedy(prompt_ids: list[int], max_tokens: int) -> tuple[str, int]:
        ids = list(generate_tokens(model, prompt_ids, max_tokens, temperature=0))
        return tokenizer.decode(ids, skip_special_tokens=True), len(ids)

    return greedy, tokenizer


@pytest.fixture(scope="module")
def server(ckpt):
    with live_server(ServeArgs(ckpt=str(ckpt), max_batch_size=4)) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def chat_ids(tokenizer, messages):
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def sse_lines(url, path, body, headers=None):
    with httpx.stream("POST", url + path, json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line]


def metric(url, name) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            if line.split(" ")[0] == name or name.endswith("}"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until(condition, timeout=30.0):
    """Poll `condition` until it holds (fails the test after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# ---- the happy paths ---------------------------------------------------------------------------
def test_models_health_and_metrics(server, client):
    url, _ = server
    assert [m.id for m in client.models.list()] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    assert httpx.get(url + "/health").json()["status"] == "ok"
    text = httpx.get(url + "/metrics").text
    for name in ("ling_requests_total", "ling_generation_tokens_total", "ling_queue_depth", "ling_batch_size_bucket",
                 "ling_time_to_first_token_seconds_bucket", "ling_time_per_output_token_seconds_bucket"):
        assert name in text


def test_chat_completion_equals_greedy_reference_with_exact_usage(client, reference):
    greedy, tokenizer = reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak, speak."}]
    r = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0)
    prompt = chat_ids(tokenizer, messages)
    text, n = greedy(prompt, 12)
    assert r.choices[0].message.content == text
    assert (r.choices[0].message.role, r.choices[0].finish_reason) == ("assistant", "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(prompt), 12, len(prompt) + 12)
    assert r.object == "chat.completion" and r.model == "tiny-chat"


def test_chat_stream_matches_the_whole_answer_and_ends_with_usage_and_done(server, client):
    url, _ = server
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "你好，世界 🙂"}], "max_tokens": 20,
            "temperature": 0}
    whole = client.chat.completions.create(**body)
    chunks = list(client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    lines = sse_lines(url, "/v1/chat/completions", {**body, "stream": True})
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_completions_string_list_and_token_prompts(client, reference):
    greedy, tokenizer = reference
    r = client.completions.create(model="tiny-chat", prompt="First Citizen:", max_tokens=8, temperature=0)
    ids = tokenizer.encode("First Citizen:")
    assert r.choices[0].text == greedy(ids, 8)[0]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 8)
    batch = client.completions.create(model="tiny-chat", prompt=["First Citizen:", "All: Speak"], max_tokens=8,
                                      temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [greedy(tokenizer.encode(p), 8)[0] for p in ("First Citizen:", "All: Speak")]
    by_ids = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text


def test_completion_stream_concatenates_to_the_whole_text(client):
    kwargs = dict(model="tiny-chat", prompt="Resolved.", max_tokens=16, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_choices_and_seed_reproducibility(client):
    kwargs = dict(model="tiny-chat", messages=[{"role": "user", "content": "hear me"}], max_tokens=10, temperature=1.0)
    a = client.chat.completions.create(**kwargs, n=3, seed=42)
    b = client.chat.completions.create(**kwargs, n=3, seed=42)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) == 3  # each choice samples its own text
    assert a.usage.completion_tokens == 30
    single = client.chat.completions.create(**kwargs, seed=42)
    assert single.choices[0].message.content == texts[0]  # choice i samples with seed + i
    other = client.chat.completions.create(**kwargs, seed=43)
    assert other.choices[0].message.content == texts[1]


def test_stop_string_ends_the_text_before_it_streaming_or_not(client):
    kwargs = dict(model="tiny-chat", prompt="You are all resolved", max_tokens=40, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    stop = full[10:13]
    expected = full[: full.index(stop)]
    r = client.completions.create(**kwargs, stop=[stop, "never-there"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    streamed = list(client.completions.create(**kwargs, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_presence_and_frequency_penalties_reach_the_sampler(client):
    kwargs = dict(model="tiny-chat", prompt="Speak", max_tokens=60, temperature=0, logprobs=0)
    plain = client.completions.create(**kwargs).choices[0].logprobs.tokens
    assert len(set(plain)) < len(plain)  # greedy repeats itself...
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = client.completions.create(**kwargs, **penalty).choices[0].logprobs.tokens
        assert len(set(penalised)) > len(set(plain))  # ...and a penalty makes it repeat less


def test_logprobs_chat_and_completions(client):
    r = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Speak"}],
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy took the most likely token
        assert item.logprob <= 0
    c = client.completions.create(model="tiny-chat", prompt="Speak", max_tokens=4, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.token_logprobs) == 4
    assert all(len(top) == 2 for top in c.choices[0].logprobs.top_logprobs)
    assert "".join(c.choices[0].logprobs.tokens) == c.choices[0].text


def test_unknown_fields_are_ignored(server):
    url, _ = server
    r = httpx.post(url + "/v1/completions", json={"prompt": "Speak", "max_tokens": 2, "frobnicate": {"x": 1},
                                                  "logit_bias": {}, "user": "me"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# ---- concurrency -------------------------------------------------------------------------------
def test_sixteen_concurrent_requests_equal_the_same_requests_one_at_a_time(server):
    url, _ = server
    prompts = [f"{'Speak, ' * (i % 5)}citizen number {i}" for i in range(16)]
    kwargs = [dict(model="tiny-chat", prompt=p, max_tokens=10 + i, temperature=0) for i, p in enumerate(prompts)]
    sequential = [openai.OpenAI(base_url=url + "/v1", api_key="-").completions.create(**k).choices[0].text
                  for k in kwargs]

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        answers = await asyncio.gather(*(client.completions.create(**k) for k in kwargs))
        return [a.choices[0].text for a in answers]

    assert asyncio.run(all_at_once()) == sequential
    assert metric(url, "ling_queue_depth") == 0 and metric(url, "ling_running_sequences") == 0


# ---- errors ------------------------------------------------------------------------------------
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}
MALFORMED = [
    ("chat", {"messages": []}, "messages"),
    ("chat", {"model": "tiny-chat"}, "messages"),
    ("chat", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("chat", {**CHAT, "temperature": 2.5}, "temperature"),
    ("chat", {**CHAT, "temperature": "hot"}, "temperature"),
    ("chat", {**CHAT, "top_p": 0}, "top_p"),
    ("chat", {**CHAT, "n": 0}, "n"),
    ("chat", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("chat", {**CHAT, "max_completion_tokens": -3}, "max_completion_tokens"),
    ("chat", {**CHAT, "presence_penalty": 3}, "presence_penalty"),
    ("chat", {**CHAT, "frequency_penalty": -2.5}, "frequency_penalty"),
    ("chat", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("chat", {**CHAT, "stop": [""]}, "stop"),
    ("chat", {**CHAT, "seed": "abc"}, "seed"),
    ("chat", {**CHAT, "seed": 2**64}, "seed"),
    ("chat", {**CHAT, "stream": "yes please"}, "stream"),
    ("chat", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("chat", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {**CHAT, "max_tokens": MAX_LEN}, "max_tokens"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": "Speak, speak. " * 60}]}, "messages"),
    ("completion", {"model": "tiny-chat"}, "prompt"),
    ("completion", {"prompt": 42}, "prompt"),
    ("completion", {"prompt": ""}, "prompt"),
    ("completion", {"prompt": [1, 2, 99999]}, "prompt"),
    ("completion", {"prompt": "hi", "logprobs": 6}, "logprobs"),
    ("completion", {"prompt": "hi", "echo": True}, "echo"),
]


@pytest.mark.parametrize("kind,body,param", MALFORMED, ids=[f"{k}-{p}-{i}" for i, (k, _, p) in enumerate(MALFORMED)])
def test_malformed_request_gets_400_in_openai_error_shape(server, kind, body, param):
    url, _ = server
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    r = httpx.post(url + path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_openai_client_raises_bad_request_for_an_overlong_prompt(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat", prompt="Speak, speak. " * 60)
    assert e.value.code == "context_length_exceeded"


@pytest.mark.parametrize("raw,status,code", [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, None),
    (b'{"prompt": "' + b"x" * (2 << 20) + b'"}', 413, "request_too_large"),
])
def test_unparseable_or_oversized_bodies(server, raw, status, code):
    url, _ = server
    r = httpx.post(url + "/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status
    assert r.json()["error"]["code"] == code


def test_unknown_model_and_route_are_404_in_openai_shape(server, client):
    url, _ = server
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    assert httpx.get(url + "/v1/nothing-here").json()["error"]["code"] == "not_found"


def test_api_key_is_required_on_v1_routes_only(ckpt):
    with live_server(ServeArgs(ckpt=str(ckpt), api_key="s3cret")) as (url, _):
        for key in ("wrong", "s3cret-but-longer", "s3cre"):
            bad = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
            with pytest.raises(openai.AuthenticationError):
                bad.completions.create(model="tiny-chat", prompt="hi", max_tokens=1)
        for headers in ({}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
            r = httpx.post(url + "/v1/chat/completions", json=CHAT, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny-chat", prompt="hi", max_tokens=1).usage.completion_tokens == 1
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/").status_code == 200


# ---- slots, queue, disconnects -----------------------------------------------------------------
def test_disconnect_mid_stream_frees_the_slot(long_ckpt):
    with live_server(ServeArgs(ckpt=str(long_ckpt), max_batch_size=1)) as (url, _):
        body = {"prompt": "Speak", "max_tokens": 2000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: {"))
            assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        # The only row was taken by the stream above: this request completes only once it is free.
        r = httpx.post(url + "/v1/completions", json={"prompt": "Speak", "max_tokens": 3}, timeout=30)
        assert r.json()["usage"]["completion_tokens"] == 3
        assert metric(url, 'ling_sequences_finished_total{reason="abort"}') == 1
        assert metric(url, 'ling_sequences_finished_total{reason="length"}') == 1
        assert metric(url, "ling_generation_tokens_total") < 2000


def test_a_non_streaming_client_that_hangs_up_frees_the_slot(long_ckpt):
    with live_server(ServeArgs(ckpt=str(long_ckpt), max_batch_size=1)) as (url, _):
        payload = json.dumps({"prompt": "Speak", "max_tokens": 2000, "temperature": 0}).encode()
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as raw:
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            wait_until(lambda: httpx.get(url + "/health").json()["running"] == 1)  # it is generating
        r = httpx.post(url + "/v1/completions", json={"prompt": "Speak", "max_tokens": 3}, timeout=30)
        assert r.json()["usage"]["completion_tokens"] == 3
        assert metric(url, "ling_generation_tokens_total") < 2000  # the hung-up request did not run to its end


def test_full_queue_answers_503_with_retry_after(long_ckpt):
    with live_server(ServeArgs(ckpt=str(long_ckpt), max_batch_size=1, max_queue=1)) as (url, _):
        body = {"prompt": "Speak", "max_tokens": 2000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # (kept: closing the iterator would close the stream)
            next(line for line in lines if line.startswith("data: {"))  # it holds the row
            with httpx.stream("POST", url + "/v1/completions", json=body) as waiting:
                assert waiting.status_code == 200  # submitted: the queue's one place is taken
                r = httpx.post(url + "/v1/completions", json={"prompt": "Speak", "max_tokens": 1})
                assert r.status_code == 503 and r.headers["Retry-After"] == "1"
                assert r.json()["error"]["code"] == "server_busy"
                never = httpx.post(url + "/v1/completions", json={"prompt": "Speak", "n": 2})
                assert never.status_code == 400 and never.json()["error"]["param"] == "n"  # 2 > --max-queue 1


def test_events_that_arrive_together_go_out_as_one_chunk_per_choice():
    from ling.serve.app import merge_by_index
    from ling.serve.scheduler import Event

    merged = merge_by_index([(0, Event("a", [1])), (1, Event("x")), (0, Event("b", [2], "length", 2))])
    assert [(i, e.text, e.logprobs, e.finish_reason, e.completion_tokens) for i, e in merged] == [
        (0, "ab", [1, 2], "length", 2), (1, "x", [], None, 0)]
