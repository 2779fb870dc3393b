"""`ling prepare`: formats, splits, dtypes, streaming, determinism, the URL cache, bad input."""

import functools
import http.server
import json
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from ling.data.dataset import open_dataset
from ling.data.download import cached_path
from ling.data.prepare import PrepareArgs, prepare, token_dtype
from ling.data.sources import Source, read_pieces
from ling.errors import LingError
from ling.tokenizer import EOS, Tokenizer

SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # its 65 characters


def run(tmp_path, inputs, tokenizer="char", name="out", **kwargs):
    """Prepare in-process; returns (summary, opened dataset)."""
    output = tmp_path / name
    summary = prepare(PrepareArgs(input=[str(i) for i in inputs], output=str(output), tokenizer=tokenizer, **kwargs))
    return summary, open_dataset(output)


def documents_of(dataset):
    """The texts of all documents in file order (train then val), cut at the eos separators."""
    ids = np.concatenate([dataset.train, dataset.val]).astype(np.int64)
    assert ids[-1] == dataset.eos_id
    docs, start = [], 0
    for end in np.flatnonzero(ids == dataset.eos_id):
        docs.append(dataset.tokenizer.decode(ids[start:end].tolist()))
        start = end + 1
    return docs


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def words_text(n_words, seed=0):
    """Deterministic prose-like text: words, spaces, newlines, some non-ASCII."""
    rng = np.random.default_rng(seed)
    vocab = ["the", "king", "shall", "not", "speak", "éclair", "naïve", "数据", "🎉", "be", "to", "42", "O'er"]
    words = rng.choice(vocab, size=n_words)
    seps = rng.choice([" ", " ", " ", "\n", ", ", ".\n\n", "  "], size=n_words)
    return "".join(w + s for w, s in zip(words, seps))


# ---- the nanoGPT split -----------------------------------------------------------------
def test_single_text_file_splits_like_nanogpt_shakespeare_char(tmp_path):
    """A stand-in for tinyshakespeare.txt: same length, same 65 characters."""
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list(SHAKESPEARE_CHARS), size=1_115_394))
    (tmp_path / "input.txt").write_text(text)
    summary, ds = run(tmp_path, [tmp_path / "input.txt"])

    assert ds.tokenizer.vocab_size == 65 + 4  # the characters, then bos, eos, pad, unk
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}  # nanoGPT's numbering
    assert all(ds.tokenizer.token_to_id(c) == i for c, i in stoi.items())
    # nanoGPT: train = data[:int(n * 0.9)] = 1,003,854 and val = 111,540 characters; the one
    # eos token after the document moves the cut by one
    assert (len(ds.train), len(ds.val)) == (1_003_855, 111_540)
    assert (summary["train_tokens"], summary["val_tokens"], summary["split"]) == (1_003_855, 111_540, "tail")
    assert ds.train.dtype == np.uint16 and ds.meta["dtype"] == "uint16"
    nanogpt_train = np.array([stoi[c] for c in text[: int(len(text) * 0.9)]], dtype=np.uint16)
    np.testing.assert_array_equal(ds.train[: len(nanogpt_train)], nanogpt_train)
    assert ds.tokenizer.decode(ds.val[:-1].tolist()) == text[1_003_855:]
    assert ds.val[-1] == ds.eos_id == ds.tokenizer.token_to_id(EOS)
    assert ds.meta["documents"] == 1 and ds.meta["split"]["method"] == "tail"


# ---- formats -----------------------------------------------------------------------------
@pytest.fixture
def corpus_dir(tmp_path):
    """One directory holding every supported format (and things that must be skipped)."""
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("first file\nline two\n")
    (d / "b.md").write_text("# Title\n\nmarkdown body 你好")
    write_jsonl(d / "sub" / "c.jsonl", [{"text": "json one"}, {"text": ""}, {"text": None}, {"text": "json two 🎉"}])
    (d / "sub" / "c.jsonl").write_text((d / "sub" / "c.jsonl").read_text() + "\n\n")  # blank lines are skipped
    pq.write_table(pa.table({"text": ["parquet row", None, "row two"], "id": [1, 2, 3]}), d / "sub" / "d.parquet")
    (d / "e.csv").write_text("not,a,corpus\n")
    (d / ".hidden.txt").write_text("skipped")
    return d


EXPECTED_DOCS = ["first file\nline two\n", "# Title\n\nmarkdown body 你好", "json one", "json two 🎉",
                 "parquet row", "row two"]


def test_directory_reads_every_format_in_sorted_order(tmp_path, corpus_dir):
    summary, ds = run(tmp_path, [corpus_dir])
    assert documents_of(ds) == EXPECTED_DOCS
    assert summary["documents"] == 6
    assert [(s["format"], s["documents"]) for s in ds.meta["sources"]] == [
        ("text", 1), ("text", 1), ("jsonl", 2), ("parquet", 2)]
    assert ds.meta["bytes"] == sum(s["bytes"] for s in ds.meta["sources"])


def test_files_and_globs(tmp_path, corpus_dir):
    _, ds = run(tmp_path, [corpus_dir / "sub" / "d.parquet", corpus_dir / "*.txt", corpus_dir / "**" / "*.jsonl"])
    assert documents_of(ds) == ["parquet row", "row two", "first file\nline two\n", "json one", "json two 🎉"]


def test_text_field_selects_the_json_field_and_the_parquet_column(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"body": "from json", "text": "not this"}])
    pq.write_table(pa.table({"body": ["from parquet"], "text": ["not this"]}), tmp_path / "y.parquet")
    _, ds = run(tmp_path, [tmp_path / "x.jsonl", tmp_path / "y.parquet"], text_field="body")
    assert documents_of(ds) == ["from json", "from parquet"]


def test_builtin_corpus_is_cpython_documentation_one_document_per_topic(tmp_path):
    from pydoc_data.topics import topics

    summary, ds = run(tmp_path, [], builtin=True)
    assert summary["documents"] == len(topics) > 50
    assert documents_of(ds) == [topics[name] for name in sorted(topics)]
    assert ds.meta["sources"][0]["name"].startswith("builtin:pydoc_data.topics (Python 3.")


def test_url_is_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LING_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "www"
    served.mkdir()
    (served / "tiny.txt").write_text("text served over http\n")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/tiny.txt"
        _, ds = run(tmp_path, [url], name="first")
        (served / "tiny.txt").unlink()  # the second run must not need the server's copy
        _, again = run(tmp_path, [url], name="second")
        with pytest.raises(LingError, match=r"missing.txt: download failed \(HTTP 404"):
            run(tmp_path, [f"http://127.0.0.1:{server.server_port}/missing.txt"], name="third")
    finally:
        server.shutdown()
    assert documents_of(ds) == documents_of(again) == ["text served over http\n"]
    assert requests == ["/tiny.txt", "/missing.txt"]
    assert cached_path(url).read_text() == "text served over http\n"
    assert cached_path(url).parent == tmp_path / "cache" / "downloads"
    assert sorted(p.name for p in cached_path(url).parent.iterdir()) == [cached_path(url).name]  # no partial 404 file
    assert ds.meta["sources"][0]["name"] == url


# ---- split rules and determinism -------------------------------------------------------------
def many_documents(tmp_path, n):
    records = [{"text": f"document number {i}: " + "abc " * (i % 7)} for i in range(n)]
    return write_jsonl(tmp_path / "docs.jsonl", records)


def test_many_documents_split_by_whole_documents(tmp_path):
    source = many_documents(tmp_path, 200)
    summary, ds = run(tmp_path, [source])
    assert summary["split"] == "documents" and ds.meta["split"]["val_documents"] == 20
    docs = documents_of(ds)
    originals = [json.loads(line)["text"] for line in source.read_text().splitlines()]
    assert sorted(docs) == sorted(originals)
    train_docs, val_docs = docs[:180], docs[180:]
    assert len(val_docs) == 20
    assert train_docs == [d for d in originals if d in set(train_docs)]  # each split keeps the input order
    assert ds.train[-1] == ds.val[-1] == ds.eos_id  # no document is cut between the splits


def test_few_documents_split_by_a_tail_of_tokens(tmp_path):
    _, ds = run(tmp_path, [many_documents(tmp_path, 90)], val_fraction=0.1)  # 9 validation documents: too few
    total = len(ds.train) + len(ds.val)
    assert ds.meta["split"]["method"] == "tail"
    assert len(ds.train) == int(total * 0.9)


def test_zero_val_fraction_gives_an_empty_validation_split(tmp_path):
    _, ds = run(tmp_path, [many_documents(tmp_path, 30)], val_fraction=0.0)
    assert len(ds.val) == 0 and len(documents_of(ds)) == 30


def test_same_seed_same_bytes_other_seed_other_validation_documents(tmp_path):
    source = many_documents(tmp_path, 200)
    run(tmp_path, [source], name="a", seed=7)
    run(tmp_path, [source], name="b", seed=7)
    run(tmp_path, [source], name="c", seed=8)
    for file in ("train.bin", "val.bin", "meta.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()


# ---- dtypes ------------------------------------------------------------------------------
def test_dtype_is_uint16_while_ids_fit_then_uint32():
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32


def test_a_tokenizer_with_more_than_65536_ids_writes_uint32(tmp_path):
    alphabet = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c <= 0xDFFF][:65_600]
    big = Tokenizer.train_char(["".join(alphabet)])
    big.save(tmp_path / "big-tokenizer")
    text = "".join(alphabet[-50:]) + "".join(alphabet[:50])
    (tmp_path / "wide.txt").write_text(text)
    _, ds = run(tmp_path, [tmp_path / "wide.txt"], tokenizer=str(tmp_path / "big-tokenizer"))
    assert ds.meta["dtype"] == "uint32" and ds.train.dtype == np.uint32
    assert ds.eos_id > 65_535
    assert documents_of(ds) == [text]
    assert (tmp_path / "out" / "train.bin").stat().st_size == 4 * len(ds.train)


# ---- streaming -----------------------------------------------------------------------------
def test_reading_in_pieces_never_exceeds_the_limit_and_loses_nothing(tmp_path):
    text = words_text(3000)
    (tmp_path / "long.txt").write_text(text)
    write_jsonl(tmp_path / "long.jsonl", [{"text": text}, {"text": "short"}])
    for name, fmt, expected in (("long.txt", "text", [text]), ("long.jsonl", "jsonl", [text, "short"])):
        path = tmp_path / name
        pieces = list(read_pieces(Source(name, path, fmt, path.stat().st_size), max_chars=100))
        assert max(len(p.text) for p in pieces) <= 100
        assert len(pieces) > len(text) // 100  # really streamed in many pieces
        assert sum(p.nbytes for p in pieces) == path.stat().st_size
        docs, current = [], ""
        for p in pieces:
            current += p.text
            if p.end:
                docs, current = docs + [current], ""
        assert docs == expected


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_small_chunks_give_exactly_the_one_shot_tokens(tmp_path, monkeypatch, tokenizer):
    """Memory is bounded by chunk_size, and the cuts never change a token."""
    docs = [words_text(6000, seed=1), words_text(40, seed=2), words_text(2500, seed=3)]
    (tmp_path / "one.txt").write_text(docs[0])
    write_jsonl(tmp_path / "two.jsonl", [{"text": d} for d in docs[1:]])
    inputs = [tmp_path / "one.txt", tmp_path / "two.jsonl"]
    extra = {"vocab_size": 400} if tokenizer == "bpe" else {}
    _, whole = run(tmp_path, inputs, tokenizer, name="whole", **extra)

    batches = []
    encode = Tokenizer.encode_corpus
    monkeypatch.setattr(Tokenizer, "encode_corpus", lambda self, texts: batches.append(texts) or encode(self, texts))
    _, chunked = run(tmp_path, inputs, tokenizer, name="chunked", chunk_size=500, **extra)
    assert max(sum(map(len, batch)) for batch in batches) <= 500
    assert len(batches) > sum(map(len, docs)) // 500

    assert chunked.tokenizer.hash() == whole.tokenizer.hash()
    np.testing.assert_array_equal(chunked.train, whole.train)
    np.testing.assert_array_equal(chunked.val, whole.val)
    one_shot = np.concatenate([np.append(encode(whole.tokenizer, [d])[0], whole.eos_id) for d in docs])
    np.testing.assert_array_equal(np.concatenate([chunked.train, chunked.val]), one_shot)


# ---- the dataset reader ------------------------------------------------------------------
def test_open_dataset_rejects_a_damaged_dataset(tmp_path):
    run(tmp_path, [many_documents(tmp_path, 20)])
    out = tmp_path / "out"
    with open(out / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(LingError, match="train.bin: 10 bytes, but meta.json says"):
        open_dataset(out)
    Tokenizer.train_char(["other"]).save(out)
    with pytest.raises(LingError, match="not the tokenizer these ids were made with"):
        open_dataset(out)
    with pytest.raises(LingError, match="no meta.json"):
        open_dataset(tmp_path)


# ---- bad input: one clear error, exit 1, nothing left behind -------------------------------------
def ling_prepare(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "ling", "prepare", *map(str, args)],
                          capture_output=True, text=True, cwd=tmp_path)


def bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": "broken"\n{"text": "fine"}\n')
    write_jsonl(tmp_path / "nofield.jsonl", [{"text": "ok"}, {"txt": "typo"}])
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "nocolumn.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "intcolumn.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    Tokenizer.train_char(["abc"]).save(tmp_path / "abc-tokenizer")
    (tmp_path / "abcd.txt").write_text("abcd")
    (tmp_path / "notes.csv").write_text("a,b\n")
    HFTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "no-eos.json"))


BAD_CASES = {
    "missing path": (["--input", "nowhere.txt"], "nowhere.txt: no such file or directory"),
    "empty corpus": (["--input", "empty.txt"], "no text to prepare: every input is empty (empty.txt)"),
    "malformed json": (["--input", "bad.jsonl"], "bad.jsonl:3: invalid JSON (Expecting ',' delimiter, column 18)"),
    "missing field": (["--input", "nofield.jsonl"], "nofield.jsonl:2: no field 'text'; did you mean 'txt'?"),
    "missing column": (["--input", "nocolumn.parquet"], "nocolumn.parquet: no column 'text' (it has: body)"),
    "non-text column": (["--input", "intcolumn.parquet"], "intcolumn.parquet: column 'text' holds int64, not text"),
    "corrupt parquet": (["--input", "broken.parquet"], "broken.parquet: not a readable parquet file"),
    "not utf-8": (["--input", "latin1.txt"], "latin1.txt: not UTF-8 text (invalid byte at offset 3)"),
    "unsupported type": (["--input", "abcd.txt", "notes.csv"],
                         "notes.csv: unsupported file type '.csv' (supported: .txt, .md, .jsonl, .parquet)"),
    "char outside the given tokenizer": (["--input", "abcd.txt", "--tokenizer", "abc-tokenizer"],
                                         "abcd.txt: text contains characters outside this char-level vocabulary: "
                                         "'d' (U+0064) at offset 3"),
    "tokenizer without eos": (["--input", "abcd.txt", "--tokenizer", "no-eos.json"],
                              "--tokenizer no-eos.json: the tokenizer has no eos token"),
    "bad tokenizer": (["--input", "abcd.txt", "--tokenizer", "wordpiece"], "--tokenizer wordpiece: not 'char', 'bpe'"),
    "vocab size for char": (["--input", "abcd.txt", "--vocab-size", "300"], "--vocab-size applies to --tokenizer bpe"),
    "val fraction": (["--input", "abcd.txt", "--val-fraction", "1.0"], "--val-fraction must be in [0, 1)"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_clear_error_and_leaves_no_output(tmp_path, case):
    bad_inputs(tmp_path)
    args, message = BAD_CASES[case]
    if "--tokenizer" not in args:
        args = args + ["--tokenizer", "char"]
    proc = ling_prepare(tmp_path, *args, "--output", "out")
    assert proc.returncode == 1
    assert proc.stderr.rstrip().splitlines()[-1].startswith(f"error: {message}"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]


def test_an_existing_output_is_kept_unless_overwrite(tmp_path):
    (tmp_path / "a.txt").write_text("new text")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.me").write_text("old")
    proc = ling_prepare(tmp_path, "--input", "a.txt", "--output", "out", "--tokenizer", "char")
    assert proc.returncode == 1
    assert "error: out already exists; pass --overwrite to replace it" in proc.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.me"]

    # --overwrite replaces a dataset ling prepared, never anything else.
    proc = ling_prepare(tmp_path, "--input", "a.txt", "--output", "out", "--tokenizer", "char", "--overwrite")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: out does not hold a dataset ling wrote, so --overwrite does not replace it: "
        "move it away or choose another path"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.me"]

    (tmp_path / "out" / "keep.me").unlink()  # an empty directory is replaced as if absent
    assert ling_prepare(tmp_path, "--input", "a.txt", "--output", "out", "--tokenizer", "char").returncode == 0
    (tmp_path / "a.txt").write_text("newer text")
    proc = ling_prepare(tmp_path, "--input", "a.txt", "--output", "out", "--tokenizer", "char", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "meta.json", "tokenizer.json", "tokenizer_config.json", "train.bin", "val.bin"]
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["bytes"] == len("newer text")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_cli_contract_flags_and_summary(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"content": f"doc {i} " * 5} for i in range(300)])
    proc = ling_prepare(tmp_path, "--input", "d.jsonl", "--output", "ds", "--tokenizer", "bpe", "--vocab-size", "300",
                        "--val-fraction", "0.2", "--text-field", "content", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "300 documents" in proc.stdout and "documents split" in proc.stdout
    assert "tok/s" in proc.stderr  # the progress bar shows tokens per second
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["split"] == {"method": "documents", "val_fraction": 0.2, "seed": 3, "val_documents": 60}
    assert meta["vocab_size"] == 300 and meta["text_field"] == "content"


def test_an_error_while_training_bpe_names_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
    with pytest.raises(LingError, match=r"bad.jsonl:2: field 'text' is int, expected a string"):
        run(tmp_path, [tmp_path / "bad.jsonl"], tokenizer="bpe", vocab_size=300)
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.jsonl"]


def test_overwrite_never_replaces_the_inputs(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("precious")
    (tmp_path / "corpus" / "meta.json").write_text('{"format": "ling-dataset"}')  # even in a dataset directory
    with pytest.raises(LingError, match="holds the input"):
        run(tmp_path, [tmp_path / "corpus"], name="corpus", overwrite=True)
    assert (tmp_path / "corpus" / "a.txt").read_text() == "precious"


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "x.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    message = r"x.parquet: reading .parquet needs pyarrow: pip install -e '\.\[data\]' \(from the ling checkout\)"
    with pytest.raises(LingError, match=message):
        run(tmp_path, [tmp_path / "x.parquet"])
