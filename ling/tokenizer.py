"""One `Tokenizer` over Hugging Face `tokenizers`: char-level, byte-level BPE, or any tokenizer.json.

Every tokenizer is stored as `tokenizer.json` (+ `tokenizer_config.json` holding the
special tokens and the chat template), so what ling trains opens in transformers with
`PreTrainedTokenizerFast(tokenizer_file=...)` / `AutoTokenizer.from_pretrained(dir)`, and
what transformers saved opens here.

- char-level: one id per character seen in the corpus (ids in sorted character order,
  as nanoGPT numbers them), then the special tokens. A character outside the vocabulary
  is an error that names it.
- byte-level BPE (GPT-2 style): all 256 bytes are in the base alphabet, so any Unicode
  text (Chinese, emoji, control characters, "") round-trips exactly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ling.chat_template import render_chat
from ling.errors import LingError, read_json

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]
"""The special tokens every ling-trained tokenizer has (char-level adds UNK)."""


def _token_content(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _not_unicode(text) -> str:
    """Why `text` cannot be tokenized (a lone surrogate such as "\\ud800"), or '' if it can."""
    if not isinstance(text, str):
        return f"expected text, got {type(text).__name__}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"the text is not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start} "
                "(half of a UTF-16 pair)")
    return ""

class Tokenizer:
    """Text ⇄ token ids, plus the special tokens and chat template a model was trained with."""

    def __init__(self, backend: HFTokenizer, config: dict | None = None):
        self.backend = backend
        self.config = dict(config or {})
        vocab = backend.get_vocab(with_added_tokens=True)
        model = json.loads(backend.to_str())["model"]
        self.is_char_level = model.get("type") == "BPE" and not model.get("merges") and backend.pre_tokenizer is None
        """True for ling's character tokenizer (BPE without merges or pre-tokenizer)"""
        self._char_table = _char_lookup_table(backend, model) if self.is_char_level else None
        # Fall back to ling's own names when tokenizer_config.json does not say.
        for key, default in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD), ("unk_token", UNK)):
            if _token_content(self.config.get(key)) is None and default in vocab:
                self.config[key] = default

    # ---- training ---------------------------------------------------------------------
    @classmethod
    def train_char(cls, texts: Iterable[str]) -> "Tokenizer":
        """A character-level tokenizer over every character that occurs in `texts`."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        specials = SPECIAL_TOKENS + [UNK]
        vocab = {c: i for i, c in enumerate(sorted(chars - set(specials)))}
        for tok in specials:
            vocab[tok] = len(vocab)
        # A BPE model with no merges is a character model; it encodes ~3x faster than
        # WordLevel over a per-character split.
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
        backend.decoder = decoders.Fuse()
        backend.add_special_tokens(specials)
        return cls(backend, _default_config())

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None,
                  show_progress: bool = False) -> "Tokenizer":
        """A byte-level BPE tokenizer with `vocab_size` entries (bytes + merges + specials)."""
        special_tokens = list(special_tokens or SPECIAL_TOKENS)
        minimum = 256 + len(special_tokens)
        if vocab_size < minimum:
            raise LingError(f"--vocab-size must be at least {minimum} for byte-level BPE (256 bytes + specials)")
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend, _default_config())

    # ---- files ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` (a file, or a directory holding it and tokenizer_config.json).

        The result encodes as transformers' `AutoTokenizer` does for the same files: see
        `_configure_like_transformers`. The chat template comes from tokenizer_config.json
        or, as transformers 5 saves it, from chat_template.jinja beside it.
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise LingError(f"{file}: no tokenizer.json found")
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise LingError(f"{file}: not a valid tokenizer.json ({e})") from None
        config_file = file.parent / "tokenizer_config.json"
        config = {}
        if config_file.exists():
            config = read_json(config_file)
            if not isinstance(config, dict):
                raise LingError(f"{config_file}: expected a JSON object of tokenizer settings, "
                                f"got a {type(config).__name__}")
        template_file = file.parent / "chat_template.jinja"
        if template_file.exists():
            config["chat_template"] = template_file.read_text()
        _configure_like_transformers(backend, config)
        return cls(backend, config)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")

    def to_json(self) -> str:
        return self.backend.to_str()

    def hash(self) -> str:
        """A short content hash, recorded in dataset meta.json to catch a mismatched tokenizer."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    # ---- encoding ---------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. `add_special_tokens` applies the tokenizer's post-processor
        (e.g. a BOS for Llama tokenizers), as transformers does by default."""
        encoding = self._backend_encode(text, add_special_tokens)
        self._check_unknown(text, encoding)
        return encoding.ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in `text` — to map text
        spans (e.g. the assistant's replies in a chat) to tokens."""
        encoding = self._backend_encode(text, add_special_tokens)
        self._check_unknown(text, encoding)
        return encoding.ids, encoding.offsets

    def _backend_encode(self, text: str, add_special_tokens: bool):
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens)
        except TypeError:  # what `tokenizers` raises for a str that is not valid Unicode
            raise LingError(_not_unicode(text)) from None

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        try:
            encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        except TypeError:
            raise LingError(next(_not_unicode(t) for t in texts if _not_unicode(t))) from None
        for text, encoding in zip(texts, encodings):
            self._check_unknown(text, encoding)
        return [e.ids for e in encodings]

    def encode_corpus(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids (uint32 arrays) of raw corpus text, as data preparation needs them.

        Special-token strings inside the text are ordinary text (like tiktoken's
        `encode_ordinary`: a literal "<|eos|>" in a document is not a document boundary) and
        no post-processor runs (no BOS per piece). Char-level tokenizers take a vectorized
        path, several times faster than per-character encoding, with the same ids.
        """
        if self._char_table is not None:
            return [self._encode_chars(text) for text in texts]
        previous = self.backend.encode_special_tokens
        self.backend.encode_special_tokens = True
        try:
            encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        finally:
            self.backend.encode_special_tokens = previous
        return [np.array(e.ids, dtype=np.uint32) for e in encodings]

    def _encode_chars(self, text: str) -> np.ndarray:
        table = self._char_table
        codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = table[np.minimum(codepoints, len(table) - 1)]  # the last entry is "unknown"
        unknown = np.flatnonzero(ids < 0)
        if len(unknown):
            _raise_unknown_chars(text, unknown.tolist())
        return ids.astype(np.uint32)

    def _check_unknown(self, text, encoding) -> None:
        unk = self.unk_id
        if unk is None or unk not in encoding.ids or not self.is_char_level:
            return
        offsets = [start for tok_id, (start, end) in zip(encoding.ids, encoding.offsets)
                   if tok_id == unk and text[start:end] != UNK]
        if offsets:
            _raise_unknown_chars(text, offsets)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- vocabulary -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding needs at least this many rows)."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        return max(vocab.values()) + 1 if vocab else 0

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _special_id(self, key: str) -> int | None:
        token = _token_content(self.config.get(key))
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates, as some hub models ship them: use the default
            return {t.get("name"): t.get("template") for t in template}.get("default")
        return template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self.config["chat_template"] = template

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """bos_token, eos_token, … as strings: the variables chat templates read."""
        keys = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")
        return {k: _token_content(self.config[k]) for k in keys if _token_content(self.config.get(k)) is not None}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **variables) -> str:
        """Render `messages` with this tokenizer's chat template (as transformers would)."""
        if not self.chat_template:
            raise LingError("this tokenizer has no chat template (tokenizer_config.json has no 'chat_template')")
        return render_chat(self.chat_template, messages, add_generation_prompt, self.special_tokens_map, **variables)

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Add special tokens (kept whole, never split); returns their ids."""
        self.backend.add_special_tokens(tokens)
        return [self.backend.token_to_id(t) for t in tokens]


def _raise_unknown_chars(text: str, offsets: list[int]) -> None:
    """The char-level "not in vocabulary" error, naming the first few characters and where."""
    bad = [f"{text[i]!r} (U+{ord(text[i]):04X}) at offset {i}" for i in offsets[:3]]
    more = f" and {len(offsets) - 3} more" if len(offsets) > 3 else ""
    raise LingError("text contains characters outside this char-level vocabulary: " + ", ".join(bad) + more)


def _char_lookup_table(backend: HFTokenizer, model: dict) -> np.ndarray | None:
    """codepoint → id for a plain character model (-1 = not in the vocabulary; the last entry
    catches every codepoint above the table), or None when the backend does more than map
    single characters (a normalizer, byte fallback, subword affixes) and must encode itself."""
    if backend.normalizer is not None or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        return None
    singles = {ord(token): i for token, i in model["vocab"].items() if len(token) == 1}
    table = np.full(max(singles, default=0) + 2, -1, dtype=np.int64)
    table[list(singles)] = list(singles.values())
    return table
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _configure_like_transformers(backend: HFTokenizer, config: dict) -> None:
    """Adjust a loaded tokenizer.json the way transformers does when it loads the same files.

    - special tokens named in tokenizer_config.json but absent from tokenizer.json are added;
    - BOS/EOS come from tokenizer.json's post-processor alone: transformers 5 ignores
      `add_bos_token` / `add_eos_token` in tokenizer_config.json, and so does ling;
    - truncation and padding stored in tokenizer.json are off (as in a plain transformers call);
    - `split_special_tokens` makes special-token text encode as ordinary text.
    """
    named = [_token_content(config.get(key)) for key in NAMED_SPECIAL_TOKENS]
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):  # transformers 5 may store them by name
        extra = list(extra.values())
    for token in [*named, *(_token_content(t) for t in extra)]:
        if token is not None and backend.token_to_id(token) is None:
            backend.add_special_tokens([token])
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))


def _default_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
