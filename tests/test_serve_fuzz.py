"""A fuzz test of `ling serve` from its own OpenAPI schema (schemathesis): for every route, requests
that fit the schema and requests that break it. None may get a 5xx, and every error is OpenAI's
error JSON. Examples are bounded (and derandomized, so a failure reproduces)."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings  # schemathesis brings hypothesis
from schemathesis.generation import GenerationMode

from ling.serve.server import ServeArgs
from tests.serving import live_server, make_checkpoint

EXAMPLES = {"POST": 150, "GET": 20}
"""examples per route and generation mode: well under a minute in all on 2 cores"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A short context and queue keep every accepted request small: the fuzzer may ask for n = 128.
    ckpt = make_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny-chat", context_length=24)
    with live_server(ServeArgs(ckpt=str(ckpt), max_batch_size=8, max_queue=16, body_timeout=5.0)) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def schema(server):
    schema = schemathesis.openapi.from_url(server[0] + "/openapi.json")
    # schemathesis stops reading an event stream after 20 events (and hangs up); ours always end, and
    # the check below is about how they end, so each is read whole (the context bounds its length).
    schema.config.max_stream_events = 100_000
    return schema


def assert_openai_error(response) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], body
    assert error["type"] in ("invalid_request_error", "server_error"), body
    assert set(error) == {"message", "type", "param", "code"}, body


def check(response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        assert_openai_error(response)
    elif (response.headers.get("content-type") or [""])[0].startswith("text/event-stream"):
        assert not response.stream_cut_short, "the stream was not read to its end"
        events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            assert "error" not in json.loads(event), event


def test_the_schema_lists_every_route(schema):
    routes = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert routes == {("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
                      ("GET", "/v1/models/{model_id}"), ("POST", "/v1/completions"),
                      ("POST", "/v1/chat/completions")}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_from_the_schema_gets_a_5xx(server, schema, mode):
    url, state = server
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode.is_negative and operation.method.upper() == "GET":
            continue  # nothing to break: no GET route takes a body or a typed parameter

        @settings(max_examples=EXAMPLES[operation.method.upper()], deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), print_blob=True)
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            check(case.call(base_url=url, timeout=30))

        fuzz()
    assert state.scheduler.running == 0
