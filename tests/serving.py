"""Helpers for the server tests: a small checkpoint with a chat template, and a live server on loopback."""

from __future__ import annotations

import contextlib
import threading

import torch

from ling.checkpoint import save_model_dir
from ling.config import ModelConfig
from ling.model import build_model
from ling.tokenizer import Tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m.role }}\n{{ m.content }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)
TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
        "You are all resolved rather to die than to famish? Resolved. resolved. 你好，世界 🙂 ") * 4


def make_checkpoint(directory, context_length: int = 128, chat_template: bool = True):
    """A random-init tiny model with a byte-level BPE tokenizer and a chat template (or none:
    a pretrained-only model).

    The weights are scaled up so that logits have clear margins: greedy decoding then picks
    the same token whatever the batch shape (no near-ties for rounding to flip). The EOS
    row of the LM head is zero, so greedy text never ends early: a request runs for exactly
    max_tokens, which the tests rely on.
    """
    tokenizer = Tokenizer.train_bpe([TEXT], vocab_size=300)
    tokenizer.chat_template = CHAT_TEMPLATE if chat_template else None
    cfg = ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, context_length=context_length,
                                init_std=0.3, tie_embeddings=False)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_id] = 0
    save_model_dir(model, tokenizer, directory)
    return directory


@contextlib.contextmanager
def live_server(args):
    """Run `ling serve` (in-process, on a free loopback port) for the duration of the block; yields its base URL."""
    from ling.serve.server import build_state, listen, make_server

    state = build_state(args)
    sock = listen("127.0.0.1", 0)
    server = make_server(state, args.shutdown_timeout, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", state
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
