"""Data preparation throughput (MB of input text per second), ling vs the peers, side by side.

    python benchmarks/bench_prepare.py [--data ../shared/data/tinyshakespeare.txt] [--repeat 1] [--rounds 5]

Every round runs every case once, interleaved, so a busy machine slows all cases alike;
the table reports the median MB/s and the ratio to the peer. Each case reads the file and
writes train.bin / val.bin (90/10), so all do the same job:

- char: `ling prepare --tokenizer char` (trains the vocabulary: two passes over the file) vs
  nanoGPT's data/shakespeare_char/prepare.py (sorted set, a Python dict `stoi`, np.uint16).
- bpe, given tokenizer.json: `ling prepare --tokenizer PATH` vs a plain `tokenizers`
  encode of the same file (nanoGPT's openwebtext approach, with tiktoken swapped for the
  same tokenizer file) and transformers' `PreTrainedTokenizerFast` call on it.
- bpe, trained: `ling prepare --tokenizer bpe` (training included), for reference.

`--repeat N` concatenates N copies of the file first, to measure a larger corpus.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars off: the table is the output

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from ling.data.prepare import PrepareArgs, prepare  # noqa: E402
from ling.tokenizer import Tokenizer  # noqa: E402

BPE_VOCAB = 4096


def ling_prepare(data: Path, out: Path, tokenizer: str, vocab_size: int | None = None) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        prepare(PrepareArgs(input=[str(data)], output=str(out), tokenizer=tokenizer, vocab_size=vocab_size,
                            overwrite=True))


def write_split(ids: np.ndarray, out: Path) -> None:
    """The peers' ending, as nanoGPT writes it: the first 90% to train.bin, the rest to val.bin."""
    out.mkdir(exist_ok=True)
    n = int(len(ids) * 0.9)
    ids[:n].tofile(out / "train.bin")
    ids[n:].tofile(out / "val.bin")


def nanogpt_char(data: Path, out: Path) -> None:
    text = data.read_text()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    write_split(np.array([stoi[c] for c in text], dtype=np.uint16), out)


def tokenizers_encode(data: Path, out: Path, tokenizer_file: Path) -> None:
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    write_split(np.array(tok.encode(data.read_text(), add_special_tokens=False).ids, dtype=np.uint16), out)


def transformers_encode(data: Path, out: Path, tokenizer_file: Path) -> None:
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    write_split(np.array(tok(data.read_text(), add_special_tokens=False)["input_ids"], dtype=np.uint16), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/tinyshakespeare.txt"))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if args.repeat > 1:
            data = tmp / f"corpus-x{args.repeat}.txt"
            data.write_text(args.data.read_text() * args.repeat)
        megabytes = data.stat().st_size / 1e6
        tokenizer_dir = tmp / "bpe-tokenizer"
        Tokenizer.train_bpe([args.data.read_text()], BPE_VOCAB).save(tokenizer_dir)
        tokenizer_file = tokenizer_dir / "tokenizer.json"

        cases = {
            ("char", "ling prepare --tokenizer char"): lambda: ling_prepare(data, tmp / "a", "char"),
            ("char", "nanoGPT prepare.py (stoi)"): lambda: nanogpt_char(data, tmp / "b"),
            ("bpe", "ling prepare --tokenizer PATH"): lambda: ling_prepare(data, tmp / "c", str(tokenizer_dir)),
            ("bpe", "tokenizers Tokenizer.encode"): lambda: tokenizers_encode(data, tmp / "d", tokenizer_file),
            ("bpe", "transformers PreTrainedTokenizerFast"):
                lambda: transformers_encode(data, tmp / "e", tokenizer_file),
            ("bpe", f"ling prepare --tokenizer bpe (trains {BPE_VOCAB})"):
                lambda: ling_prepare(data, tmp / "f", "bpe", BPE_VOCAB),
        }
        times = {case: [] for case in cases}
        for _ in range(args.rounds):  # interleaved
            for case, run in cases.items():
                start = time.perf_counter()
                run()
                times[case].append(time.perf_counter() - start)

    peers = {"char": "nanoGPT prepare.py (stoi)", "bpe": "tokenizers Tokenizer.encode"}
    rate = {case: megabytes / statistics.median(t) for case, t in times.items()}
    print(f"{data.name}: {megabytes:.2f} MB, {args.rounds} interleaved rounds, median; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"tokenizers {tokenizers.__version__}, transformers {transformers.__version__}\n")
    print("| tokenizer | case | MB/s | vs peer |\n|---|---|---:|---:|")
    for (kind, name), mbps in rate.items():
        print(f"| {kind} | {name} | {mbps:.2f} | {mbps / rate[(kind, peers[kind])]:.2f}x |")


if __name__ == "__main__":
    main()
