"""The tokenizer as GGUF metadata, and a `tokenizer.json` rebuilt from it.

GGUF carries no tokenizer.json: llama.cpp keeps the vocabulary (`tokenizer.ggml.tokens`,
with a type per token), the merges and the special ids as metadata, and implements the
pre-tokenizer itself, chosen by name (`tokenizer.ggml.pre`). A wrong name still loads and
silently splits text differently from training — the classic cause of garbage output after
an export. So ling writes a name only where llama.cpp's pre-tokenizer of that name is the
one the tokenizer really has (`PRE_TOKENIZERS`: the same regex, normaliser and merge rule),
and refuses otherwise, naming what it found. Import builds exactly that pre-tokenizer back.

ling writes byte-level BPE (`tokenizer.ggml.model` = gpt2), the kind ling trains and
GPT-2, Llama 3, Qwen2/3 and SmolLM use. The chat template travels as
`tokenizer.chat_template`, without `{% generation %}` tags (a transformers extension that
marks training targets; llama.cpp's template engine does not know it, and it renders the
same without them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Optional

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ling.errors import LingError
from ling.tokenizer import Tokenizer

# llama.cpp's token types (llama_token_type / gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(pattern: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@dataclass(frozen=True)
class PreTokenizer:
    """A llama.cpp pre-tokenizer (by its `tokenizer.ggml.pre` name) as `tokenizers` builds it."""

    name: str
    used_by: str
    build: Callable
    """() → the `tokenizers` pre-tokenizer"""
    normalizer: Optional[Callable] = None
    """() → the normaliser the family's tokenizer.json has (llama.cpp applies none: Qwen's NFC
    changes only text not already in NFC, which is rare)"""
    ignore_merges: bool = False
    """a word already in the vocabulary is one token, merges or not (llama.cpp sets it per name)"""


PRE_TOKENIZERS = (
    PreTokenizer("gpt-2", "GPT-2, ling's byte-level BPE",
                 lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)),
    PreTokenizer("llama-bpe", "Llama 3", lambda: _split_then_bytes(LLAMA3_SPLIT), ignore_merges=True),
    PreTokenizer("qwen2", "Qwen2, Qwen2.5, Qwen3", lambda: _split_then_bytes(QWEN2_SPLIT), normalizer=normalizers.NFC),
    PreTokenizer("smollm", "SmolLM, SmolLM2",
                 lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])),
)
SUPPORTED_PRE = ", ".join(f"{p.name} ({p.used_by})" for p in PRE_TOKENIZERS)


def _state(component) -> dict | None:
    """A tokenizers component as JSON, minus what does not change the ids (offset trimming)."""
    if component is None:
        return None

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "trim_offsets"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads(component.__getstate__()))


@dataclass
class TokenizerMetadata:
    """Everything GGUF says about a byte-level BPE tokenizer (`tokenizer.*` keys)."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    model: str = "gpt2"

    @classmethod
    def from_metadata(cls, meta: dict) -> "TokenizerMetadata":
        """The `tokenizer.*` keys of a GGUF file (absent ones as llama.cpp assumes them)."""
        g = "tokenizer.ggml."
        tokens = list(meta.get(g + "tokens", []))
        pre = meta.get(g + "pre", "default")
        return cls(pre=pre, tokens=tokens, token_types=list(meta.get(g + "token_type", [NORMAL] * len(tokens))),
                   merges=list(meta.get(g + "merges", [])), bos_id=meta.get(g + "bos_token_id"),
                   eos_id=meta.get(g + "eos_token_id"), pad_id=meta.get(g + "padding_token_id"),
                   unk_id=meta.get(g + "unknown_token_id"),
                   add_bos=bool(meta.get(g + "add_bos_token", pre == "llama-bpe")),  # llama.cpp's default for Llama 3
                   add_eos=bool(meta.get(g + "add_eos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"), model=meta.get(g + "model", "none"))


# ---- export -------------------------------------------------------------------------------
def match_pre_tokenizer(backend: HFTokenizer) -> PreTokenizer:
    """The llama.cpp pre-tokenizer that splits text exactly as `backend` does, or a LingError."""
    model = json.loads(backend.to_str())["model"]
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        raise LingError("this is a SentencePiece-style BPE tokenizer (byte fallback: Llama 2, Mistral v0.1, TinyLlama), "
                        f"which ling does not write to GGUF; ling writes byte-level BPE with the pre-tokenizer of {SUPPORTED_PRE}")
    if model.get("type") != "BPE" or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or backend.pre_tokenizer is None:
        raise LingError(f"this tokenizer ({model.get('type')} model, pre-tokenizer "
                        f"{_state(backend.pre_tokenizer)}) is not byte-level BPE; ling writes byte-level BPE tokenizers "
                        f"to GGUF, with the pre-tokenizer of {SUPPORTED_PRE}")
    ours = (_state(backend.pre_tokenizer), _state(backend.normalizer), bool(model.get("ignore_merges")))
    for pre in PRE_TOKENIZERS:
        theirs = (_state(pre.build()), _state(pre.normalizer() if pre.normalizer else None), pre.ignore_merges)
        if ours == theirs:
            return pre
    found = json.dumps(ours[0])
    raise LingError(f"no llama.cpp pre-tokenizer matches this tokenizer's (pre_tokenizer {found[:160]}, normalizer "
                    f"{json.dumps(ours[1])}, ignore_merges {ours[2]}); ling exports these: {SUPPORTED_PRE}")


GENERATION_TAG = re.compile(r"{%-?\s*(end)?generation\s*-?%}")


def export_chat_template(template: str | None) -> str | None:
    """The template without `{% generation %}` / `{% endgeneration %}` (they render their body as is)."""
    return GENERATION_TAG.sub("", template) if template else template


def _bos_eos(tokenizer: Tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS (the post-processor), found by encoding a probe."""
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a", add_special_tokens=True)
    if plain == full:
        return False, False
    start = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), None)
    added_front, added_back = (full[:start], full[start + len(plain):]) if start is not None else (full, [])
    if added_front not in ([], [tokenizer.bos_id]) or added_back not in ([], [tokenizer.eos_id]):
        raise LingError(f"this tokenizer's post-processor adds {added_front + added_back}, which llama.cpp cannot "
                        "reproduce (it adds at most a BOS in front and an EOS at the end)")
    return bool(added_front), bool(added_back)


def tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int) -> TokenizerMetadata:
    """The GGUF tokenizer keys for a model with `vocab_size` embedding rows (ids the tokenizer
    does not use become llama.cpp's unused `[PADn]` tokens)."""
    backend = tokenizer.backend
    if tokenizer.is_char_level:
        raise LingError("ling's character-level tokenizer has no GGUF equivalent (llama.cpp reads byte-level BPE and "
                        "SentencePiece vocabularies); prepare the data with --tokenizer bpe and train on that")
    pre = match_pre_tokenizer(backend)
    if tokenizer.vocab_size > vocab_size:
        raise LingError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size} embedding rows")
    added = backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        token = backend.id_to_token(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(token)
            types.append(NORMAL if i not in added else CONTROL if added[i].special else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(backend.to_str())["model"]["merges"]]
    add_bos, add_eos = _bos_eos(tokenizer)
    return TokenizerMetadata(pre=pre.name, tokens=tokens, token_types=types, merges=merges, bos_id=tokenizer.bos_id,
                             eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, unk_id=tokenizer.unk_id,
                             add_bos=add_bos, add_eos=add_eos,
                             chat_template=export_chat_template(tokenizer.chat_template))


# ---- import -------------------------------------------------------------------------------
def tokenizer_from_metadata(meta: TokenizerMetadata, where: str) -> Tokenizer:
    """A ling Tokenizer (tokenizer.json + config) that encodes as llama.cpp does with this file."""
    if meta.model != "gpt2":
        raise LingError(f"{where}: tokenizer.ggml.model '{meta.model}' is not supported (ling reads byte-level BPE, "
                        "'gpt2'; SentencePiece 'llama' vocabularies are not)")
    pre = next((p for p in PRE_TOKENIZERS if p.name == meta.pre), None)
    if pre is None:
        raise LingError(f"{where}: tokenizer.ggml.pre '{meta.pre}' is not supported (ling reads {SUPPORTED_PRE})")
    vocab = {t: i for i, (t, kind) in enumerate(zip(meta.tokens, meta.token_types)) if kind != UNUSED}
    merges = [tuple(m.split(" ", 1)) for m in meta.merges]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges))
    if pre.normalizer is not None:
        backend.normalizer = pre.normalizer()
    backend.pre_tokenizer = pre.build()
    backend.decoder = decoders.ByteLevel()
    kinds = dict(zip(meta.tokens, meta.token_types))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in vocab
                                if kinds[t] in (CONTROL, UNKNOWN)])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in vocab if kinds[t] == USER_DEFINED])
    name = {i: t for t, i in vocab.items()}.get
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for key, gguf_key, token_id in (("bos_token", "bos_token_id", meta.bos_id), ("eos_token", "eos_token_id", meta.eos_id),
                                    ("pad_token", "padding_token_id", meta.pad_id),
                                    ("unk_token", "unknown_token_id", meta.unk_id)):
        if token_id is not None:
            if name(token_id) is None:
                raise LingError(f"{where}: tokenizer.ggml.{gguf_key} is {token_id}, which is not a token of the vocabulary")
            config[key] = name(token_id)
    front = [config["bos_token"]] if meta.add_bos and "bos_token" in config else []
    back = [config["eos_token"]] if meta.add_eos and "eos_token" in config else []
    if front or back:  # llama.cpp adds these around every encoded text
        backend.post_processor = processors.TemplateProcessing(
            single=front + ["$A"] + back, pair=front + ["$A"] + back + front + ["$B:1"] + back,
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(front + back)])
    if meta.chat_template:
        config["chat_template"] = meta.chat_template
    return Tokenizer(backend, config)
