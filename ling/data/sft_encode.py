"""Examples → (tokens, labels): the chat template, and which tokens the loss counts.

The prompt format is the base tokenizer's own `chat_template`, so a fine-tuned model is
asked questions the way its tokenizer says. A tokenizer without one gets the built-in
ChatML template (`install_chatml`), whose `<|im_start|>`/`<|im_end|>` tokens are added as
special tokens; the template then travels with the output's tokenizer_config.json so that
`ling chat` and `ling serve` format prompts identically.

Which tokens are trained. By default only the assistant's replies (and the end-of-turn
text the template puts after them, so the model learns to stop); `train_on_prompt` trains
every token. Assistant text is located in the rendered conversation either by the
template's `{% generation %}` blocks or, for templates without them, by rendering growing
prefixes of the conversation and taking what each assistant turn adds. Character spans are
then mapped to tokens through the tokenizer's offsets, so this works for any template and
any tokenizer. Labels are the next token where that token is trained, -100 elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ling.chat_template import render_chat_with_spans
from ling.data.batch import IGNORE_INDEX as IGNORE
from ling.data.sft import Example
from ling.errors import LingError
from ling.tokenizer import Tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, as Qwen and many others use it, with `{% generation %}` marking what is learned."""

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def install_chatml(tokenizer: Tokenizer) -> list[int]:
    """Give a tokenizer that has no chat template the built-in ChatML one.

    Adds `<|im_start|>` and `<|im_end|>` as special tokens and makes `<|im_end|>` the
    end-of-sequence token (generation stops at the end of the assistant's turn). Returns the
    ids of the tokens that are new, for the embedding to grow by.
    """
    before = tokenizer.vocab_size
    ids = tokenizer.add_special_tokens([IM_START, IM_END])
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.config["eos_token"] = IM_END
    return [i for i in ids if i >= before]


@dataclass
class Encoded:
    """One example as model input: tokens, and the label (next token or IGNORE) at each position."""

    tokens: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def n_trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def assistant_spans(tokenizer: Tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of what the assistant says."""
    template = tokenizer.chat_template
    special = tokenizer.special_tokens_map
    text, spans = render_chat_with_spans(template, messages, False, special)
    if _GENERATION_TAG.search(template):
        return text, spans
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat_with_spans(template, messages[:i], True, special)[0]
        through = render_chat_with_spans(template, messages[: i + 1], False, special)[0]
        if not (through.startswith(before) and text.startswith(through)):
            raise LingError(
                f"the chat template does not render this conversation as a sequence of growing prefixes "
                f"(at message {i}), so the assistant's text cannot be located; add {{% generation %}} blocks "
                f"to the template, or pass --train-on-prompt"
            )
        spans.append((len(before), len(through)))
    return text, spans


def _token_flags(tokenizer: Tokenizer, text: str, spans: list[tuple[int, int]] | None) -> tuple[list[int], list[bool]]:
    """Token ids of `text` and, per token, whether it overlaps a span (all True without spans)."""
    ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=False)
    if spans is None:
        return ids, [True] * len(ids)
    return ids, [any(start < e and end > s for s, e in spans) for start, end in offsets]


def encode_example(example: Example, tokenizer: Tokenizer, max_seq_len: int, train_on_prompt: bool = False) -> Encoded:
    """Tokens and labels of one example, cut to `max_seq_len` tokens.

    A conversation is rendered with the tokenizer's chat template; a text is encoded as the
    tokenizer would for pretraining (post-processor specials, then end-of-sequence).
    """
    if example.messages is not None:
        text, spans = assistant_spans(tokenizer, example.messages)
        tokens, trained = _token_flags(tokenizer, text, None if train_on_prompt else spans)
    else:
        tokens = tokenizer.encode(example.text, add_special_tokens=True)
        if tokenizer.eos_id is not None:
            tokens.append(tokenizer.eos_id)
        trained = [True] * len(tokens)
    labels = [tok if flag else IGNORE for tok, flag in zip(tokens[1:], trained[1:])] + [IGNORE]
    truncated = len(tokens) > max_seq_len
    return Encoded(tokens[:max_seq_len], labels[:max_seq_len], truncated)


def encode_prompt(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to where the assistant starts answering (for sampling)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_labelled(example: Example, tokenizer: Tokenizer, max_seq_len: int, classes: dict) -> Encoded:
    """A classification example: its text's tokens (cut to `max_seq_len`), labelled with the
    class index at the last token (the one that has read the whole text) and IGNORE elsewhere —
    so batching, packing and the trainer's loss treat it like any other example."""
    tokens = tokenizer.encode(example.text)
    kept = tokens[:max_seq_len]
    return Encoded(kept, [IGNORE] * (len(kept) - 1) + [classes[example.label]], len(tokens) > max_seq_len)
