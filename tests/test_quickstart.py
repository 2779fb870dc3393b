"""`ling quickstart` end to end, with a tiny time budget."""

import subprocess
import sys

import pytest

from ling.checkpoint import load_checkpoint
from tests.train_helpers import one_thread_env


@pytest.mark.slow
def test_quickstart_prepares_trains_samples_and_summarises(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "ling", "quickstart", "--minutes", "0.05", "--out", str(out),
                           "--sample-tokens", "40"], capture_output=True, text=True, env=one_thread_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for expected in ("before training:", "after training:", "tokens seen", "val loss",
                     f"checkpoint: {out / 'run' / 'best'}", f"curves:     {out / 'run' / 'report.png'}",
                     "next, try:", "ling generate"):
        assert expected in text, expected
    assert (out / "data" / "meta.json").exists() and (out / "run" / "report.png").exists()
    model, tokenizer = load_checkpoint(out / "run" / "best")
    assert model.cfg.vocab_size == tokenizer.vocab_size

