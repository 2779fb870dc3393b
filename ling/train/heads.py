"""Task heads: a pretrained transformer reused as a sequence classifier.

`SequenceClassifier` maps final hidden states to class logits with one linear layer,
`score`, in place of the LM head. Only each example's last token (the one position that has
read the whole text in a causal model) carries a label, so the trainer's ordinary loss over
labelled positions is the classification cross-entropy, and packing works unchanged. Saved as a normal checkpoint
directory (so the body stays loadable everywhere) plus `head.safetensors` (`score.weight`)
and `head.json` (task and label names), which `ling eval` recognises.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ling.atomic import set_default_mode
from ling.errors import LingError
from ling.model import Transformer

HEAD_CONFIG, HEAD_WEIGHTS = "head.json", "head.safetensors"


class SequenceClassifier(nn.Module):
    """Class logits (B, T, n_classes) at every position; the last token's are the prediction."""

    def __init__(self, body: Transformer, labels: list):
        super().__init__()
        self.body = body
        self.labels = list(labels)
        self.score = nn.Linear(body.cfg.n_embd, len(labels), bias=False, device=body.embed.weight.device)
        nn.init.normal_(self.score.weight, std=body.cfg.init_std)

    @property
    def cfg(self):
        return self.body.cfg

    @property
    def activation_checkpointing(self) -> bool:
        return self.body.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.body.activation_checkpointing = value

    def forward(self, tokens: torch.Tensor, positions=None, mask=None) -> torch.Tensor:
        return self.score(self.body.hidden_states(tokens, positions, mask))


def save_head(model: SequenceClassifier, directory: str | Path) -> None:
    """Write head.json and head.safetensors (the body is saved as a checkpoint or adapter beside them)."""
    directory = Path(directory)
    save_file({"score.weight": model.score.weight.detach().float().contiguous().cpu()}, str(directory / HEAD_WEIGHTS))
    set_default_mode(directory / HEAD_WEIGHTS)
    (directory / HEAD_CONFIG).write_text(json.dumps({"task": "classification", "labels": model.labels}, indent=2) + "\n")


def is_classifier_dir(path: str | Path) -> bool:
    return (Path(path) / HEAD_CONFIG).exists()


def _read_head(directory: Path) -> tuple[list, torch.Tensor]:
    try:
        config = json.loads((directory / HEAD_CONFIG).read_text())
        return config["labels"], load_file(str(directory / HEAD_WEIGHTS))["score.weight"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise LingError(f"{directory}: broken classification head ({HEAD_CONFIG} / {HEAD_WEIGHTS}: {e})") from None


def load_head_weights(model: SequenceClassifier, directory: str | Path) -> None:
    """Copy a saved head into `model`'s (in place: an optimizer keeps its reference)."""
    directory = Path(directory)
    labels, weight = _read_head(directory)
    if labels != model.labels or tuple(weight.shape) != tuple(model.score.weight.shape):
        raise LingError(f"{directory}: the saved head has classes {labels}, this model {model.labels}")
    with torch.no_grad():
        model.score.weight.copy_(weight)


def load_classifier(body: Transformer, directory: str | Path) -> SequenceClassifier:
    """Attach the head saved in `directory` to `body` (its transformer, already loaded)."""
    labels, _ = _read_head(Path(directory))
    model = SequenceClassifier(body, labels)
    load_head_weights(model, directory)
    return model
