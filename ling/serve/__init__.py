"""Serving: an OpenAI-compatible HTTP API with continuous batching, and a chat page.

- the running batch itself is `ling.infer.Engine` (sequences join and leave its static KV cache)
- `scheduler` the model thread: admits waiting requests, steps the batch, streams events
- `protocol`  OpenAI request validation, error shape, response helpers
- `app`       the FastAPI routes;  `metrics` Prometheus metrics;  `server` `ling serve`
- `static/chat.html` the chat page (no external resources)
"""
