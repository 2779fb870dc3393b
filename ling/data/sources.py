"""Corpus inputs → documents, streamed as text pieces of bounded size.

An input is a file, a directory (searched recursively, hidden entries skipped), a glob, an
http(s):// URL (downloaded once into the cache) or the builtin corpus. The format follows the
suffix: `.txt` / `.md` — the whole file is one document; `.jsonl` — one document per line, from
a JSON field; `.parquet` — one document per row, from a string column. Empty and null
documents are skipped.

Every document arrives as pieces of at most `max_chars` characters, so memory stays bounded
however large a file or a document is. A piece ends where cutting does not change the
tokens: just before a whitespace character that follows a letter or digit (the end of a
word). No pre-token of a GPT-2 or Llama-3 style byte-level tokenizer spans such a point, and
none of a char-level tokenizer spans anything, so for those the pieces' ids concatenate to
exactly the ids of the whole document. (A tokenizer that prepends a space to every text, like
SentencePiece's, may differ at those cuts — one per `max_chars` characters of a long document.)
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple
from urllib.parse import urlparse

from ling.data.download import download
from ling.dataclass_io import closest
from ling.errors import LingError

FORMATS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
SUFFIXES = ", ".join(FORMATS)
BUILTIN = "builtin:pydoc_data.topics"
"""The builtin corpus: CPython's own English documentation topics, one document per topic."""

PARQUET_BATCH_ROWS = 128


@dataclass(frozen=True)
class Source:
    """One input file (or the builtin corpus), resolved and with its format known."""

    name: str
    """what meta.json records: the path, the URL, or `builtin:...`"""
    path: Path | None
    format: str
    size: int
    """bytes of input, the progress bar's total"""


class Piece(NamedTuple):
    text: str
    end: bool
    """the last piece of its document"""
    nbytes: int
    """input bytes this piece accounts for (summed over a source: its size)"""
    where: str
    """the document, for error messages: `file`, `file:line`, `file row N`, `builtin topic 'name'`"""
    start: int = 0
    """offset of the piece's first character in its document"""


# ---- inputs → sources -----------------------------------------------------------------
def resolve_inputs(inputs: list[str], builtin: bool = False) -> list[Source]:
    """Expand files, directories, globs and URLs into sources, in the order given."""
    sources = []
    for spec in inputs:
        if spec.startswith(("http://", "https://")):
            fmt = _format_of(Path(urlparse(spec).path), spec)
            path = download(spec)
            sources.append(Source(spec, path, fmt, path.stat().st_size))
        elif os.path.isfile(spec):
            sources.append(_file_source(Path(spec), _format_of(Path(spec), spec)))
        elif os.path.isdir(spec):
            files = _supported_files_under(Path(spec))
            if not files:
                raise LingError(f"{spec}: directory holds no {SUFFIXES} files")
            sources += [_file_source(f, FORMATS[f.suffix.lower()]) for f in files]
        elif glob.has_magic(spec):
            files = [Path(m) for m in sorted(glob.glob(spec, recursive=True))
                     if os.path.isfile(m) and Path(m).suffix.lower() in FORMATS]
            if not files:
                raise LingError(f"{spec}: the pattern matches no {SUFFIXES} files")
            sources += [_file_source(f, FORMATS[f.suffix.lower()]) for f in files]
        else:
            raise LingError(f"{spec}: no such file or directory")
    if builtin:
        size = sum(len(text.encode()) for text in _builtin_topics().values())
        # the topics differ between Python versions, so the name records the version
        sources.append(Source(f"{BUILTIN} (Python {sys.version.split()[0]})", None, "builtin", size))
    if not sources:
        raise LingError("nothing to prepare: give --input PATH [PATH ...] or --builtin")
    return sources


def _format_of(path: Path, spec: str) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise LingError(f"{spec}: unsupported file type '{path.suffix or path.name}' (supported: {SUFFIXES})")
    return fmt


def _file_source(path: Path, fmt: str) -> Source:
    return Source(str(path), path, fmt, path.stat().st_size)


def _supported_files_under(directory: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in sorted(names) if not n.startswith(".") and Path(n).suffix.lower() in FORMATS]
    return files


def _builtin_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise LingError(
            "this Python lacks pydoc_data (the builtin corpus; some distributions strip it): "
            "install the full standard library, or give --input"
        ) from None
    return topics


# ---- sources → pieces -----------------------------------------------------------------
def read_pieces(source: Source, max_chars: int, text_field: str = "text") -> Iterator[Piece]:
    """The documents of one source, as pieces of at most `max_chars` characters."""
    if source.format == "text":
        return _read_text(source.path, max_chars)
    if source.format == "jsonl":
        return _read_jsonl(source.path, text_field, max_chars)
    if source.format == "parquet":
        return _read_parquet(source.path, text_field, max_chars)
    return _read_builtin(max_chars)


_WORD_END_REVERSED = re.compile(r"\s(?=[^\W_])")
"""In reversed text: a whitespace character that (originally) follows a letter or digit."""


def word_end_before(text: str, start: int, stop: int) -> int:
    """The last index in (start, stop) of a whitespace character that follows a letter or
    digit — a safe place to cut — or `stop` when there is none (a hard cut)."""
    window = 256
    while True:
        lo = max(start, stop - window)
        match = _WORD_END_REVERSED.search(text[lo:stop][::-1])
        if match:
            return stop - 1 - match.start()
        if lo == start:
            return stop
        window *= 8


def split_text(text: str, max_chars: int) -> Iterator[str]:
    """`text` as pieces of at most `max_chars` characters, cut at word ends where possible."""
    start = 0
    while len(text) - start > max_chars:
        cut = word_end_before(text, start, start + max_chars)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _document(text: str, max_chars: int, nbytes: int, where: str) -> Iterator[Piece]:
    """One in-memory document as pieces; the first carries the input bytes it came from."""
    pieces = list(split_text(text, max_chars))
    start = 0
    for i, piece in enumerate(pieces):
        yield Piece(piece, i == len(pieces) - 1, nbytes if i == 0 else 0, where, start)
        start += len(piece)


def _read_text(path: Path, max_chars: int) -> Iterator[Piece]:
    """A whole file as one document, read `max_chars` bytes at a time (a UTF-8 character is
    at least one byte, so a read never decodes to more than `max_chars` characters)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset, start = "", 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(max_chars - len(carry))
            pending = len(decoder.getstate()[0])
            try:
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                where = offset - pending + e.start
                raise LingError(f"{path}: not UTF-8 text (invalid byte at offset {where})") from None
            offset += len(block)
            if not block:
                if offset:  # an empty file is no document
                    yield Piece(text, True, 0, str(path), start)
                return
            cut = word_end_before(text, 0, len(text))
            yield Piece(text[:cut], False, len(block), str(path), start)
            carry, start = text[cut:], start + cut


def _read_jsonl(path: Path, field: str, max_chars: int) -> Iterator[Piece]:
    skipped_bytes = 0  # blank lines and empty documents: counted with the next document
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            skipped_bytes += len(line)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line.rstrip(b"\r\n"))
            except UnicodeDecodeError as e:
                raise LingError(f"{where}: not UTF-8 text ({e.reason})") from None
            except json.JSONDecodeError as e:
                raise LingError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(record, dict):
                raise LingError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
            if field not in record:
                raise LingError(f"{where}: no field '{field}'{_field_hint(field, list(record))}")
            text = record[field]
            if text is None or text == "":
                continue
            if not isinstance(text, str):
                raise LingError(f"{where}: field '{field}' is {type(text).__name__}, expected a string")
            yield from _document(text, max_chars, skipped_bytes, where)
            skipped_bytes = 0
    if skipped_bytes:
        yield Piece("", False, skipped_bytes, str(path))


def _field_hint(field: str, names: list[str]) -> str:
    hint = closest(field, names)
    listed = ", ".join(map(str, names[:10])) + (", ..." if len(names) > 10 else "")
    return (f"; did you mean '{hint}'?" if hint else f" (it has: {listed})") + " Choose one with --text-field."


def _read_parquet(path: Path, column: str, max_chars: int) -> Iterator[Piece]:
    """Rows in batches of PARQUET_BATCH_ROWS (pyarrow decodes a row group's column at a time)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LingError(f"{path}: reading .parquet needs pyarrow: "
                        f"pip install -e '.[data]' (from the ling checkout)") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise LingError(f"{path}: not a readable parquet file ({e})") from None
    schema = parquet.schema_arrow
    if column not in schema.names:
        raise LingError(f"{path}: no column '{column}'{_field_hint(column, schema.names)}")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise LingError(f"{path}: column '{column}' holds {kind}, not text; choose a string column with --text-field")
    rows, size = parquet.metadata.num_rows, path.stat().st_size
    done, unreported = 0, 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
            # input bytes are spread over rows in proportion (a parquet file has no per-row size)
            unreported += size * (done + batch.num_rows) // rows - size * done // rows
            done += batch.num_rows
            for row, text in enumerate(batch.column(0).to_pylist(), done - batch.num_rows + 1):
                if text:
                    yield from _document(text, max_chars, unreported, f"{path} row {row}")
                    unreported = 0
    except pa.ArrowException as e:
        raise LingError(f"{path}: cannot read column '{column}' ({e})") from None
    if unreported:
        yield Piece("", False, unreported, str(path))


def _read_builtin(max_chars: int) -> Iterator[Piece]:
    topics = _builtin_topics()
    for name in sorted(topics):
        yield from _document(topics[name], max_chars, len(topics[name].encode()), f"builtin topic '{name}'")
