"""`ling eval --tasks` and `LingLM`: lm-evaluation-harness on ling's engine, checked against
lm_eval's own `HFLM` on the `ling convert to-hf` export of the same tiny random model.

No network: the tasks are YAML files over local JSONL written here, and the Hub is off.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

for _name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"

lm_eval = pytest.importorskip("lm_eval")
import lm_eval.evaluator  # noqa: E402
import lm_eval.tasks  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from ling import cli  # noqa: E402
from ling.checkpoint import save_model_dir  # noqa: E402
from ling.config import ModelConfig  # noqa: E402
from ling.eval.harness import LingLM  # noqa: E402
from ling.hf.convert import ToHFArgs, to_hf  # noqa: E402
from ling.model import build_model  # noqa: E402
from ling.tokenizer import Tokenizer  # noqa: E402

WORDS = ("the cat sat on a mat and the dog ran to the red door while a bird sang in the old tree near "
         "our small house by the river ").split()
QUESTIONS = [
    {"question": "Where did the cat sit?", "choices": ["on the mat", "in the tree", "by the river", "at the door"],
     "answer": 0},
    {"question": "What did the bird do?", "choices": ["ran", "sang", "sat"], "answer": 1},
    {"question": "What colour was the door?", "choices": ["red", "old", "small", "the dog ran to it"], "answer": 0},
    {"question": "Who ran to the door?", "choices": ["the cat", "a bird", "the dog"], "answer": 2},
    {"question": "Where was the house?", "choices": ["by the river", "on a mat"], "answer": 0},
]
MC_TASK = """task: ling_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_TASK = """task: ling_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny random llama-like ling checkpoint (BPE tokenizer with BOS/EOS) and its HF export."""
    root = tmp_path_factory.mktemp("lm-eval")
    text = " ".join(WORDS * 8)
    tokenizer = Tokenizer.train_bpe([text] * 4, vocab_size=320, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"])
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, context_length=48)
    model = build_model(cfg).eval()
    with torch.no_grad():  # larger weights than the init: sharper, more varied distributions
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    save_model_dir(model, tokenizer, root / "ling")
    to_hf(ToHFArgs(str(root / "ling"), str(root / "hf")))
    return root / "ling", root / "hf"


@pytest.fixture(scope="module")
def models(checkpoints):
    ling_dir, hf_dir = checkpoints
    ours = LingLM(str(ling_dir), batch_size=4, dtype="fp32")
    theirs = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=4)
    assert ours.max_length == theirs.max_length == 48
    return ours, theirs


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (root / "ling_mc.yaml").write_text(MC_TASK.format(data=data))
    (root / "ling_gen.yaml").write_text(GEN_TASK.format(data=data))
    return root


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


LONG = " ".join(WORDS * 3)  # ~100 tokens: more than the 48-token window


def test_loglikelihood_equals_hflm(models):
    ours, theirs = models
    pairs = [("the cat sat", " on a mat"), ("the cat sat", " by the river"), ("the cat sat ", "in the tree"),
             ("the cat sat", " on"), ("the cat sat", " in"), ("", "the dog ran"), ("a bird", " sang"),
             ("Question: where?\nAnswer:", " the old tree near our small house"),
             (LONG, " by the river"), (LONG, " near our house"),  # truncated on the left, as HFLM does
             ("the", " " + " ".join(WORDS[:20]))]
    requests = _instances("loglikelihood", pairs)
    expected = theirs.loglikelihood(requests, disable_tqdm=True)
    got = ours.loglikelihood(requests, disable_tqdm=True)
    torch.testing.assert_close(torch.tensor([v for v, _ in got]), torch.tensor([v for v, _ in expected]),
                               rtol=1.3e-6, atol=1e-4)  # the issue's 1e-4, plus fp32's default relative tolerance
    assert [g for _, g in got] == [g for _, g in expected]
    assert ours.truncated["loglikelihood"] == 2


def test_a_hugging_face_directory_scores_as_its_ling_checkpoint(models, checkpoints):
    ours, _ = models
    _, hf_dir = checkpoints
    requests = _instances("loglikelihood", [("the cat sat", " on a mat"), ("a bird", " sang in the old tree")])
    from_hf = LingLM(str(hf_dir), batch_size=2, dtype="fp32").loglikelihood(requests, disable_tqdm=True)
    torch.testing.assert_close(from_hf, ours.loglikelihood(requests, disable_tqdm=True))


def test_shared_contexts_score_as_whole_rows(models):
    """Running a shared context once into the cache gives what running every row whole gives."""
    ours, _ = models
    continuations = (" a bird sang", " the dog ran", " to the red door while", " in the old tree near")
    pairs = [(LONG[:120], c) for c in continuations] + [(LONG[:60], c) for c in (" our", " small house by")]
    requests = _instances("loglikelihood", pairs)
    before = ours.contexts_shared
    shared = ours.loglikelihood(requests, disable_tqdm=True)
    assert ours.contexts_shared > before
    ours.share_contexts = False
    try:
        whole = ours.loglikelihood(requests, disable_tqdm=True)
    finally:
        ours.share_contexts = True
    torch.testing.assert_close(torch.tensor([v for v, _ in shared]), torch.tensor([v for v, _ in whole]),
                               rtol=1.3e-6, atol=1e-4)  # the issue's 1e-4, plus fp32's default relative tolerance


def test_loglikelihood_rolling_equals_hflm(models):
    ours, theirs = models
    texts = [("the cat sat on a mat",), (LONG,), (" ".join(WORDS * 2),)]
    requests = _instances("loglikelihood_rolling", texts)
    expected = theirs.loglikelihood_rolling(requests, disable_tqdm=True)
    got = ours.loglikelihood_rolling(requests, disable_tqdm=True)
    # the issue's 1e-4, plus fp32's default relative tolerance
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1.3e-6, atol=1e-4)


def test_generate_until_gives_hflm_greedy_text(models):
    ours, theirs = models
    theirs_one = HFLM(pretrained=theirs.model, tokenizer=theirs.tokenizer, device="cpu", batch_size=1)
    args = [("the cat sat", {"until": ["door"], "max_gen_toks": 20, "do_sample": False}),
            ("a bird sang in", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}),
            ("the dog", {"until": [" the", "."], "max_gen_toks": 16, "do_sample": False}),
            (LONG, {"until": ["river"], "max_gen_toks": 10, "do_sample": False})]  # context truncated on the left
    requests = _instances("generate_until", args)
    expected = theirs_one.generate_until(requests, disable_tqdm=True)
    got = ours.generate_until(requests, disable_tqdm=True)
    assert got == expected
    assert any(got) and ours.truncated["generate_until"] >= 1


def test_multiple_choice_task_gives_hflm_accuracy(models, tasks_dir):
    ours, theirs = models
    manager = lm_eval.tasks.TaskManager(include_path=str(tasks_dir), include_defaults=False)
    scores = [lm_eval.evaluator.simple_evaluate(model=lm, tasks=["ling_mc"], task_manager=manager,
                                                bootstrap_iters=0)["results"]["ling_mc"] for lm in (ours, theirs)]
    for metric in ("acc,none", "acc_norm,none"):
        assert scores[0][metric] == scores[1][metric]
    assert scores[0]["acc,none"] in {i / len(QUESTIONS) for i in range(len(QUESTIONS) + 1)}


def run_ling(*args, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ling", *map(str, args)], capture_output=True, text=True, env=env)


def test_cli_writes_lm_eval_results_and_samples(checkpoints, tasks_dir, tmp_path):
    ling_dir, _ = checkpoints
    out = tmp_path / "results.json"
    proc = run_ling("eval", ling_dir, "--tasks", "ling_mc,ling_gen", "--tasks-dir", tasks_dir, "--limit", 4,
                    "--batch-size", 4, "--out", out, "--log-samples", "--bootstrap-iters", 0)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"ling_mc", "ling_gen"}
    assert {"acc,none", "acc_norm,none"} <= set(results["results"]["ling_mc"])
    assert "exact_match,none" in results["results"]["ling_gen"]
    assert results["n-samples"]["ling_mc"]["effective"] == 4
    assert {"configs", "versions", "n-shot", "higher_is_better"} <= set(results)
    samples = [json.loads(line) for line in (tmp_path / "results_samples_ling_mc.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all("resps" in s for s in samples)
    assert "acc_norm" in proc.stdout and "ling_gen" in proc.stdout
    assert "truncated on the left" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (("--tasks", "ling_mc", "--log-samples"), "--out"),
    (("--tasks", "ling_mc", "--data", "x.txt"), "one of the two"),
    (("--tasks", ","), "at least one task"),
])
def test_bad_input_is_one_clear_line(checkpoints, tasks_dir, capsys, args, message):
    ling_dir, _ = checkpoints
    assert cli.main(["eval", str(ling_dir), "--tasks-dir", str(tasks_dir), *args]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_unknown_task_names_the_closest_registered_ones(checkpoints, tasks_dir, capsys):
    ling_dir, _ = checkpoints
    assert cli.main(["eval", str(ling_dir), "--tasks", "ling_mc,hellaswagg", "--tasks-dir", str(tasks_dir)]) == 1
    assert capsys.readouterr().err.strip().startswith(
        f"error: --tasks: unknown task 'hellaswagg' (nor in --tasks-dir {tasks_dir}); closest: hellaswag")


def test_a_hub_task_offline_says_to_use_local_files(checkpoints, tmp_path):
    ling_dir, _ = checkpoints
    empty = {"HF_HOME": str(tmp_path / "hf-home"), "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    proc = run_ling("eval", ling_dir, "--tasks", "arc_easy", env=empty)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Hugging Face Hub" in lines[0] and "--tasks-dir DIR" in lines[0], proc.stderr


def test_without_lm_eval_the_error_says_how_to_install(checkpoints, monkeypatch, capsys):
    ling_dir, _ = checkpoints
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    assert cli.main(["eval", str(ling_dir), "--tasks", "hellaswag"]) == 1
    assert capsys.readouterr().err.strip() == "error: lm-eval tasks need the lm_eval package: pip install -e '.[eval]'"
