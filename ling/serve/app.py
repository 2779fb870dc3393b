"""The FastAPI app: OpenAI-compatible routes over the scheduler, health, metrics and the chat page.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as
server-sent events ending in `data: [DONE]`, or one JSON answer with `usage`), GET /health,
GET /metrics (Prometheus text), GET / (the chat page), GET /openapi.json and /docs (the
schema of every route, request bodies included). With an API key, every /v1 route needs
`Authorization: Bearer KEY`.

No request can harm another or the server: a body is read within `body_timeout` seconds
and `max_body_bytes`, parsed strictly (see `protocol`), and tokenised in a worker thread,
so a 1 MB prompt never holds up the event loop; every error, a 500 included, is answered in
OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ling.errors import LingError
from ling.infer import SamplingParams
from ling.kernels import KernelReport
from ling.serve.metrics import Metrics
from ling.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    ErrorResponse,
    error_body,
    new_id,
    now,
    parse_request,
    usage,
)
from ling.serve.scheduler import Event, QueueFull, Scheduler
from ling.tokenizer import Tokenizer


@dataclass
class ServerState:
    """What the routes need: the model's name and tokenizer, the scheduler and the limits."""

    model_name: str
    tokenizer: Tokenizer
    scheduler: Scheduler
    metrics: Metrics
    max_model_len: int
    vocab_size: int
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    body_timeout: float = 30.0
    """seconds a client may take to send its request body (408 beyond)"""
    created: int = 0
    kernels: KernelReport = field(default_factory=KernelReport)
    """what the engine decodes with (`ling.kernels`), shown at /health"""


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        yield
        state.scheduler.stop()

    app = FastAPI(title="ling", summary="An OpenAI-compatible API over a ling checkpoint", lifespan=lifespan,
                  docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), code=code), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(part) for part in first["loc"]) or None
        return JSONResponse(error_body(f"{param}: {first['msg']}" if param else first["msg"], param=param,
                                       code="invalid_value"), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):  # a bug: still OpenAI's shape (and logged)
        return JSONResponse(error_body("The server had an error while processing your request.",
                                       type="server_error"), status_code=500)

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), state.api_key.encode())):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    v1 = [Depends(authorize)]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return HTMLResponse(resources.files("ling.serve").joinpath("static/chat.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_name, "running": state.scheduler.running,
                "waiting": state.scheduler.waiting, "kernels": state.kernels.to_dict()}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models", dependencies=v1)
    async def list_models():
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{model_id:path}", dependencies=v1)
    async def get_model(model_id: str):
        check_model(state, model_id)
        return model_card(state)

    @app.post("/v1/chat/completions", dependencies=v1, openapi_extra=request_body(ChatRequest))
    async def chat_completions(request: Request):
        return await handle(state, request, "chat")

    @app.post("/v1/completions", dependencies=v1, openapi_extra=request_body(CompletionRequest))
    async def completions(request: Request):
        return await handle(state, request, "completion")

    app.openapi = lambda: openapi_schema(app)
    return app


ERROR_RESPONSES = {"4XX": {"description": "OpenAI's error JSON", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}}


def request_body(model) -> dict:
    """The OpenAPI of a route that reads its body itself (strictly, see `handle`): the
    pydantic model's schema, whose nested models `openapi_schema` adds to the components."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}, "responses": ERROR_RESPONSES}


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema of the routes, plus the request and error models (built once)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ChatRequest, CompletionRequest, ErrorResponse):
            definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(definition.pop("$defs", {}))
            components[model.__name__] = definition
        app.openapi_schema = schema
    return app.openapi_schema


def model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "ling",
            "max_model_len": state.max_model_len, "chat_template": bool(state.tokenizer.chat_template)}


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{state.model_name}'.",
                       param="model", code="model_not_found")


# ---- one request ------------------------------------------------------------------------------
async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refusing more than `limit` bytes before reading them all, and a client that
    takes more than `timeout` seconds to send it (a stalled upload would hold a connection)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    body = bytearray()

    async def receive() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")

    try:
        await asyncio.wait_for(receive(), timeout)
    except ClientDisconnect:  # gone before the body arrived: nobody to answer
        raise APIError(400, "the client disconnected while sending the request", code="client_disconnected") from None
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None
    return bytes(body)


def build_prompts(state: ServerState, req, kind: str) -> list[list[int]]:
    return chat_prompt(state, req) if kind == "chat" else completion_prompts(state, req)


async def handle(state: ServerState, request: Request, kind: str):
    route = request.url.path
    started = time.perf_counter()
    try:
        body = await read_body(request, state.max_body_bytes, state.body_timeout)
        req = parse_request(ChatRequest if kind == "chat" else CompletionRequest, body)
        check_model(state, req.model)
        # In a worker thread: templating and tokenising a long prompt must not stall other requests.
        prompts = await asyncio.to_thread(build_prompts, state, req, kind)
        requests = sampling_requests(state, req, prompts)
        try:
            submission = state.scheduler.submit(requests)
        except QueueFull as e:
            raise APIError(503, f"The server is busy: {e}. Retry later.", type="server_error",
                           code="server_busy", headers={"Retry-After": "1"}) from None
        except LingError as e:  # the engine's own checks of a request
            raise APIError(400, str(e)) from None
    except APIError as e:
        state.metrics.requests.labels(route=route, status=str(e.status)).inc()
        raise
    state.metrics.requests.labels(route=route, status="200").inc()
    answer = Answer(state, req, kind, prompts)
    if req.stream:
        stream = answer.stream(submission, started, route)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(cancel_on_disconnect(request, submission))
    try:
        return await answer.whole(submission)
    finally:
        watcher.cancel()
        submission.cancel()  # a no-op once the answer is whole
        state.metrics.request_latency.labels(route=route).observe(time.perf_counter() - started)


async def cancel_on_disconnect(request: Request, submission) -> None:
    """Cancel a non-streamed request whose client hung up (the body is read, so the next
    ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    submission.cancel()


def chat_prompt(state: ServerState, req: ChatRequest) -> list[list[int]]:
    messages = [m.as_template_message() for m in req.messages]
    try:
        text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except LingError as e:
        raise APIError(400, f"cannot format the messages: {e}", param="messages") from None
    # The template already wrote the special tokens, as transformers' apply_chat_template(tokenize=True).
    return [encode(state, text, "messages", add_special_tokens=False)]


def completion_prompts(state: ServerState, req: CompletionRequest) -> list[list[int]]:
    prompt = req.prompt
    if isinstance(prompt, str):
        return [encode(state, prompt, "prompt")]
    if isinstance(prompt[0], str):
        return [encode(state, p, "prompt") for p in prompt]
    if isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    if any(t >= state.vocab_size for p in prompts for t in p):
        raise APIError(400, f"prompt: token ids must be below the vocabulary size {state.vocab_size}", param="prompt")
    return prompts


def encode(state: ServerState, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
    try:
        ids = state.tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except LingError as e:
        raise APIError(400, f"{param}: {e}", param=param) from None
    if not ids:
        raise APIError(400, f"{param}: the prompt is empty", param=param)
    return ids


def sampling_requests(state: ServerState, req, prompts: list[list[int]]) -> list[tuple[list[int], SamplingParams]]:
    """(prompt ids, sampling params) for n sequences per prompt; with a seed, choice i samples
    with seed + i (so choice 0 is what the same request with n = 1 gives)."""
    limit = state.max_model_len
    param = "messages" if isinstance(req, ChatRequest) else "prompt"
    if len(prompts) * req.n > state.scheduler.max_queue:
        raise APIError(400, f"{len(prompts) * req.n} sequences (prompts × n) can never fit the server's queue of "
                       f"{state.scheduler.max_queue}", param="n")
    requests = []
    for prompt in prompts:
        room = limit - len(prompt)
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the {param} "
                           f"is {len(prompt)} tokens. Shorten the {param}.", param=param,
                           code="context_length_exceeded")
        max_tokens = req.token_limit
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; you requested "
                           f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the {param}, {max_tokens} "
                           f"in the completion). Reduce the {param} or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        top = req.logprobs_count
        for i in range(req.n):
            params = SamplingParams(
                max_new_tokens=max_tokens or room, temperature=req.temperature, top_p=req.top_p,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, stop=list(req.stop),
                seed=None if req.seed is None else req.seed + i, logprobs=top is not None, top_logprobs=top or 0,
                slide=False)  # OpenAI semantics: a full context ends the answer ("length")
            requests.append((prompt, params))
    return requests


class Answer:
    """Turns scheduler events into OpenAI responses: one JSON object, or a stream of chunks."""

    def __init__(self, state: ServerState, req, kind: str, prompts: list[list[int]]):
        self.state, self.req, self.kind = state, req, kind
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = now()
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.text_offset = collections.Counter()

    async def whole(self, submission) -> dict:
        n = len(submission.handles)
        texts, logprobs, reasons, tokens = [""] * n, [[] for _ in range(n)], [None] * n, [0] * n
        async for index, event in submission:
            self._raise_if_error(event)
            texts[index] += event.text
            logprobs[index] += event.logprobs
            if event.finish_reason is not None:
                reasons[index], tokens[index] = event.finish_reason, event.completion_tokens
        choices = []
        for i in range(n):
            if self.kind == "chat":
                choice = {"index": i, "message": {"role": "assistant", "content": texts[i]},
                          "logprobs": self._logprobs(logprobs[i], i), "finish_reason": reasons[i]}
            else:
                choice = {"index": i, "text": texts[i], "logprobs": self._logprobs(logprobs[i], i),
                          "finish_reason": reasons[i]}
            choices.append(choice)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.state.model_name,
                "choices": choices, "usage": usage(self.prompt_tokens, sum(tokens))}

    async def stream(self, submission, started: float, route: str) -> AsyncIterator[str]:
        include_usage = self.req.include_usage
        completion_tokens = 0
        try:
            if self.kind == "chat":
                for i in range(len(submission.handles)):
                    yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}])
            async for batch in submission.batches():
                chunks = []
                for index, event in merge_by_index(batch):
                    if event.error is not None:
                        chunks.append(sse(error_body(event.error, type="server_error")))
                        continue
                    reason = event.finish_reason
                    if event.text or event.logprobs or reason is not None:
                        logprobs = self._logprobs(event.logprobs, index)
                        chunks.append(self._chunk([self._delta(index, event.text, logprobs, reason)]))
                    if reason is not None:
                        completion_tokens += event.completion_tokens
                yield "".join(chunks)
            if include_usage:
                yield self._chunk([], usage=usage(self.prompt_tokens, completion_tokens))
            yield "data: [DONE]\n\n"
        finally:  # also when the client hung up: free the rows at once
            submission.cancel()
            self.state.metrics.request_latency.labels(route=route).observe(time.perf_counter() - started)

    def _delta(self, index, text, logprobs, reason) -> dict:
        if self.kind == "chat":
            return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                    "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        chunk = {"id": self.id, "object": obj, "created": self.created, "model": self.state.model_name,
                 "choices": choices}
        if self.req.include_usage:
            chunk["usage"] = usage
        return sse(chunk)

    def _logprobs(self, items, index: int) -> dict | None:
        if self.req.logprobs_count is None:
            return None
        token = lambda token_id: self.state.tokenizer.decode([token_id])  # noqa: E731
        if self.kind == "chat":
            entry = lambda t, lp: {"token": t, "logprob": lp, "bytes": list(t.encode())}  # noqa: E731
            return {"content": [{**entry(token(x.token_id), x.logprob),
                                 "top_logprobs": [entry(token(i), lp) for i, lp in x.top]} for x in items]}
        tokens = [token(x.token_id) for x in items]
        offsets = []
        for t in tokens:  # where each token starts in the choice's text
            offsets.append(self.text_offset[index])
            self.text_offset[index] += len(t)
        return {"tokens": tokens, "token_logprobs": [x.logprob for x in items],
                "top_logprobs": [{token(i): lp for i, lp in x.top} for x in items], "text_offset": offsets}

    @staticmethod
    def _raise_if_error(event: Event) -> None:
        if event.error is not None:
            raise APIError(500, event.error, type="server_error")


def merge_by_index(batch: list[tuple[int, Event]]) -> list[tuple[int, Event]]:
    """Events of one choice that arrived together, as one (text and logprobs joined)."""
    merged: dict[int, Event] = {}
    for index, event in batch:
        if index not in merged:
            merged[index] = Event(event.text, list(event.logprobs), event.finish_reason, event.completion_tokens,
                                  event.error)
        else:
            into = merged[index]
            into.text += event.text
            into.logprobs += event.logprobs
            into.finish_reason, into.completion_tokens = event.finish_reason, event.completion_tokens
            into.error = into.error or event.error
    return list(merged.items())


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
