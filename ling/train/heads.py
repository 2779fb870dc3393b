"""Task heads: a pretrained transformer reused as a sequence classifier.

`SequenceClassifier` reads the final hidden state of each sequence's last real token (the
only position that has seen the whole text in a causal model) and maps it to class logits
with one linear layer, `score` — the LM head is not used. Saved as a normal checkpoint
directory (so the body stays loadable everywhere) plus `head.safetensors` (`score.weight`)
and `head.json` (task and label names), which `ling eval` recognises.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ling.checkpoint import save_model_dir
from ling.errors import LingError
from ling.model import Transformer
from ling.tokenizer import Tokenizer

HEAD_CONFIG, HEAD_WEIGHTS = "head.json", "head.safetensors"


class SequenceClassifier(nn.Module):
    """Class logits (B, n_classes) from the hidden state at `last` (B,), each row's final token."""

    def __init__(self, body: Transformer, labels: list):
        super().__init__()
        self.body = body
        self.labels = list(labels)
        self.score = nn.Linear(body.cfg.n_embd, len(labels), bias=False, device=body.embed.weight.device)
        nn.init.normal_(self.score.weight, std=body.cfg.init_std)

    @property
    def cfg(self):
        return self.body.cfg

    def forward(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        hidden = self.body.hidden_states(tokens)
        return self.score(hidden[torch.arange(tokens.shape[0], device=tokens.device), last])


def save_classifier(model: SequenceClassifier, tokenizer: Tokenizer | None, directory: str | Path) -> None:
    directory = Path(directory)
    save_model_dir(model.body, tokenizer, directory)
    save_file({"score.weight": model.score.weight.detach().float().contiguous().cpu()}, str(directory / HEAD_WEIGHTS))
    (directory / HEAD_CONFIG).write_text(json.dumps({"task": "classification", "labels": model.labels}, indent=2) + "\n")


def is_classifier_dir(path: str | Path) -> bool:
    return (Path(path) / HEAD_CONFIG).exists()


def load_classifier(body: Transformer, directory: str | Path) -> SequenceClassifier:
    """Attach the head saved in `directory` to `body` (its transformer, already loaded)."""
    directory = Path(directory)
    try:
        config = json.loads((directory / HEAD_CONFIG).read_text())
        weight = load_file(str(directory / HEAD_WEIGHTS))["score.weight"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise LingError(f"{directory}: broken classification head ({HEAD_CONFIG} / {HEAD_WEIGHTS}: {e})") from None
    model = SequenceClassifier(body, config["labels"])
    if tuple(weight.shape) != tuple(model.score.weight.shape):
        raise LingError(f"{directory / HEAD_WEIGHTS}: score.weight has shape {tuple(weight.shape)}, "
                        f"expected {tuple(model.score.weight.shape)}")
    with torch.no_grad():
        model.score.weight.copy_(weight)
    return model
