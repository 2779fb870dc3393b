"""`ling prepare`: a corpus → the dataset directory that pretraining reads.

    DIR/train.bin, DIR/val.bin    flat token ids (uint16 when the vocabulary fits, else uint32),
                                  every document followed by the eos token
    DIR/meta.json                 dtype, token and document counts, split, tokenizer hash, sources
    DIR/tokenizer.json (+ tokenizer_config.json)

Two streaming passes keep memory bounded by `chunk_size`, however large the corpus: the
first counts the documents (training the tokenizer on the way for `char` / `bpe`), the second
tokenizes up to `chunk_size` characters at a time and appends the ids to the .bin files.

The split is deterministic. With many documents it is by whole documents: `val_fraction` of
them, picked with `seed`. With few (fewer than MIN_VAL_DOCUMENTS would go to validation — a
single text file is one document) it is the last `val_fraction` of the tokens, the way
nanoGPT splits tinyshakespeare.
"""

from __future__ import annotations

import collections
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

import ling
from ling.atomic import atomic_dir, check_output_dir
from ling.data.dataset import is_dataset_dir
from ling.data.sources import Piece, Source, read_pieces, resolve_inputs
from ling.errors import LingError
from ling.tokenizer import Tokenizer

MIN_VAL_DOCUMENTS = 10
"""Split by documents only when validation gets at least this many of them."""
DEFAULT_BPE_VOCAB = 8192
PIECE_CHARS = 1 << 16
"""Long documents are cut into pieces this size (or chunk_size, if smaller), so that one
batch of a single huge document still encodes on every core."""


@dataclass
class PrepareArgs:
    """Tokenize text into a dataset directory: train.bin, val.bin, meta.json, tokenizer.json."""

    output: str
    """the dataset directory to write"""
    tokenizer: str
    """'char' (train a character-level tokenizer), 'bpe' (train byte-level BPE) or the path of a tokenizer.json (or
    of a directory holding one) to use as it is"""
    input: list[str] = field(default_factory=list)
    """files, directories or globs of .txt / .md / .jsonl / .parquet, or http(s):// URLs (downloaded once into
    ~/.cache/ling)"""
    vocab_size: int | None = None
    """BPE vocabulary size: 256 bytes + merges + special tokens; 8192 when not given"""
    val_fraction: float = 0.1
    """share of the corpus held out for validation"""
    text_field: str = "text"
    """the JSON field (.jsonl) or column (.parquet) holding each document's text"""
    seed: int = 0
    """picks the validation documents when the split is by documents"""
    builtin: bool = False
    """add the builtin corpus: the English documentation topics shipped inside CPython (no download)"""
    overwrite: bool = False
    """replace OUTPUT if it holds a dataset ling prepared (swapped once the new one is complete)"""
    chunk_size: int = 1 << 22
    """characters read and tokenized per batch: bounds memory (about 50 bytes per character at peak)"""


def prepare(args: PrepareArgs) -> dict:
    """Write the dataset directory `args.output`; returns the summary it prints."""
    started = time.perf_counter()
    _check_args(args)
    output = check_output_dir(args.output, args.overwrite, is_dataset_dir, "a dataset")
    given = None if args.tokenizer in ("char", "bpe") else _load_tokenizer(args.tokenizer)
    sources = resolve_inputs(args.input, args.builtin)
    for source in sources:  # --overwrite must never replace the corpus itself
        if source.path is not None and output.resolve() in source.path.resolve().parents:
            raise LingError(f"--output {output} holds the input {source.name}; write the dataset elsewhere")
    total_bytes = sum(s.size for s in sources)

    tokenizer, documents = _first_pass(sources, args, given, total_bytes)
    n_documents = sum(documents)
    if n_documents == 0:
        raise LingError(f"no text to prepare: every input is empty ({', '.join(s.name for s in sources)})")
    dtype = token_dtype(tokenizer.vocab_size)
    n_val_documents = round(n_documents * args.val_fraction)
    by_documents = MIN_VAL_DOCUMENTS <= n_val_documents < n_documents
    val_documents = _pick_documents(n_documents, n_val_documents, args.seed) if by_documents else None

    with atomic_dir(output, overwrite=args.overwrite) as directory:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing") as bar, \
                _SplitWriter(directory, dtype, tokenizer, val_documents, bar) as writer:
            pieces = (piece for source in sources for piece in _read(source, args))
            for batch in _batches(pieces, args.chunk_size):
                writer.write(batch)
        tokens = writer.tokens
        if not by_documents:
            n_train = int(tokens["train"] * (1 - args.val_fraction))
            _move_tail_to_val(directory, dtype, n_train)
            tokens = {"train": n_train, "val": tokens["train"] - n_train}
        split = {"method": "documents" if by_documents else "tail", "val_fraction": args.val_fraction,
                 "seed": args.seed, "val_documents": n_val_documents if by_documents else None}
        tokenizer.save(directory)
        meta = _meta(args, tokenizer, dtype, tokens, n_documents, split, sources, documents, total_bytes)
        (directory / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    seconds = time.perf_counter() - started
    summary = {"output": str(output), "documents": n_documents, "train_tokens": tokens["train"],
               "val_tokens": tokens["val"], "split": split["method"], "vocab_size": tokenizer.vocab_size,
               "dtype": dtype.name, "bytes": total_bytes, "seconds": seconds}
    _print_summary(summary)
    return summary


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (a vocabulary of at most 65,536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _check_args(args: PrepareArgs) -> None:
    if not 0 <= args.val_fraction < 1:
        raise LingError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.chunk_size < 1:
        raise LingError(f"--chunk-size must be at least 1 character, got {args.chunk_size}")
    if args.vocab_size is not None and args.tokenizer != "bpe":
        raise LingError("--vocab-size applies to --tokenizer bpe only (char and given tokenizers have theirs)")


def _load_tokenizer(path: str) -> Tokenizer:
    if not Path(path).exists():
        raise LingError(f"--tokenizer {path}: not 'char', 'bpe', or an existing tokenizer.json file or directory")
    tokenizer = Tokenizer.load(path)
    if tokenizer.eos_id is None:
        raise LingError(f"--tokenizer {path}: the tokenizer has no eos token, which separates documents; "
                        "set 'eos_token' in its tokenizer_config.json")
    return tokenizer


def _read(source: Source, args: PrepareArgs) -> Iterator[Piece]:
    return read_pieces(source, min(args.chunk_size, PIECE_CHARS), args.text_field)


def _first_pass(sources, args, given: Tokenizer | None, total_bytes: int) -> tuple[Tokenizer, list[int]]:
    """Count each source's documents and, for char / bpe, train the tokenizer on the way."""
    documents = [0] * len(sources)

    def texts(bar) -> Iterator[str]:
        for i, source in enumerate(sources):
            for piece in _read(source, args):
                documents[i] += piece.end
                bar.update(piece.nbytes)
                yield piece.text

    desc = {"char": "reading (char vocabulary)", "bpe": "reading (training BPE)"}
    desc = desc.get(args.tokenizer, "counting documents")
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc) as bar:
        if args.tokenizer == "char":
            tokenizer = Tokenizer.train_char(texts(bar))
        elif args.tokenizer == "bpe":
            tokenizer = Tokenizer.train_bpe(texts(bar), args.vocab_size or DEFAULT_BPE_VOCAB)
        else:
            tokenizer = given
            collections.deque(texts(bar), maxlen=0)
    return tokenizer, documents


def _pick_documents(n_documents: int, k: int, seed: int) -> np.ndarray:
    """A mask of `k` documents out of `n_documents`, the same for the same seed."""
    mask = np.zeros(n_documents, dtype=bool)
    mask[np.random.default_rng(seed).choice(n_documents, size=k, replace=False)] = True
    return mask


def _batches(pieces: Iterator[Piece], max_chars: int) -> Iterator[list[Piece]]:
    """Consecutive pieces grouped into batches of at most `max_chars` characters."""
    batch, chars = [], 0
    for piece in pieces:
        if batch and chars + len(piece.text) > max_chars:
            yield batch
            batch, chars = [], 0
        batch.append(piece)
        chars += len(piece.text)
    if batch:
        yield batch


class _SplitWriter:
    """Appends token ids to train.bin / val.bin, each document whole to the split its mask says."""

    def __init__(self, directory: Path, dtype: np.dtype, tokenizer: Tokenizer, val_documents, bar: tqdm):
        self.files = {split: open(directory / f"{split}.bin", "wb") for split in ("train", "val")}
        self.dtype, self.tokenizer, self.val_documents, self.bar = dtype, tokenizer, val_documents, bar
        self.eos = np.array([tokenizer.eos_id], dtype=np.uint32)
        self.tokens = {"train": 0, "val": 0}
        self.document = 0
        self.started = time.perf_counter()

    def write(self, batch: list[Piece]) -> None:
        parts = {"train": [], "val": []}
        for piece, ids in zip(batch, self._encode(batch)):
            in_val = self.val_documents is not None and self.val_documents[self.document]
            split = "val" if in_val else "train"
            parts[split] += [ids, self.eos] if piece.end else [ids]
            self.document += piece.end
        for split, arrays in parts.items():
            if arrays:
                ids = np.concatenate(arrays).astype(self.dtype)
                ids.tofile(self.files[split])
                self.tokens[split] += len(ids)
        rate = sum(self.tokens.values()) / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{tqdm.format_sizeof(rate)} tok/s", refresh=False)
        self.bar.update(sum(p.nbytes for p in batch))

    def _encode(self, batch: list[Piece]) -> list[np.ndarray]:
        try:
            return self.tokenizer.encode_corpus([p.text for p in batch])
        except LingError:  # e.g. a character a given char-level tokenizer lacks: say where
            for piece in batch:
                try:
                    self.tokenizer.encode_corpus([piece.text])
                except LingError as e:
                    relative = f" (offsets count from character {piece.start} of the document)" if piece.start else ""
                    raise LingError(f"{piece.where}: {e}{relative}") from None
            raise

    def __enter__(self) -> "_SplitWriter":
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files.values():
            f.close()


def _move_tail_to_val(directory: Path, dtype: np.dtype, n_train: int) -> None:
    """The tail split: everything after the first `n_train` tokens of train.bin becomes val.bin."""
    train, val = directory / "train.bin", directory / "val.bin"
    with open(train, "rb") as src, open(val, "wb") as dst:
        src.seek(n_train * dtype.itemsize)
        shutil.copyfileobj(src, dst, 1 << 24)
    with open(train, "r+b") as f:
        f.truncate(n_train * dtype.itemsize)


def _meta(args, tokenizer: Tokenizer, dtype, tokens, n_documents, split, sources, documents, total_bytes) -> dict:
    specials = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id, "unk": tokenizer.unk_id}
    return {
        "format": "ling-dataset",
        "version": 1,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokens": tokens,
        "documents": n_documents,
        "document_separator": "eos",
        "special_ids": specials,
        "tokenizer": args.tokenizer if args.tokenizer in ("char", "bpe") else str(Path(args.tokenizer).resolve()),
        "tokenizer_hash": tokenizer.hash(),
        "split": split,
        "bytes": total_bytes,
        "sources": [{"name": s.name, "format": s.format, "documents": d, "bytes": s.size}
                    for s, d in zip(sources, documents)],
        "text_field": args.text_field,
        "ling_version": ling.__version__,
    }


def _print_summary(s: dict) -> None:
    total = s["train_tokens"] + s["val_tokens"]
    rate = s["bytes"] / max(s["seconds"], 1e-9)
    print(f"wrote {s['output']}: vocab {s['vocab_size']:,} ({s['dtype']})\n"
          f"  {s['documents']:,} document{'s' * (s['documents'] != 1)}, {total:,} tokens: "
          f"train {s['train_tokens']:,}, val {s['val_tokens']:,} ({s['split']} split)\n"
          f"  {tqdm.format_sizeof(s['bytes'], 'B')} in {s['seconds']:.1f} s ({tqdm.format_sizeof(rate, 'B/s')})")
