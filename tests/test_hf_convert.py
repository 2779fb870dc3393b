"""`ling convert from-hf / to-hf`: round trips, sharding, and clear errors on bad input."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ling import cli
from ling.checkpoint import load_checkpoint, save_model_dir
from ling.config import ModelConfig, RopeScaling
from ling.errors import LingError
from ling.hf.checkpoint import read_hf_config
from ling.hf.convert import FromHFArgs, ToHFArgs, from_hf, to_hf
from ling.model import build_model
from ling.tokenizer import Tokenizer
from ling.weights import read_safetensors
from tests.hf_models import VARIANTS, ling_logits, max_diff_over_valid, padded_batch, save_hf_model

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Native ling configs and the HF architecture each must export as.
NATIVE = {
    "llama-like": ("LlamaForCausalLM", ModelConfig.from_name("tiny", vocab_size=300)),
    "gpt2-like-untied": ("GPT2LMHeadModel", ModelConfig(vocab_size=300, context_length=64, n_layer=2, n_embd=32,
                                                        n_head=4, bias="all", tie_embeddings=False)),
    # nanoGPT's bias=False, as the shakespeare-char preset: GPT-2 with zero biases.
    "gpt2-like-without-biases": ("GPT2LMHeadModel", ModelConfig(vocab_size=300, context_length=64, n_layer=2,
                                                                n_embd=32, n_head=4, norm_bias=False, bias="none")),
    "qwen2-like": ("Qwen2ForCausalLM", ModelConfig.from_name("tiny", vocab_size=300, bias="qkv")),
    "qwen3-like": ("Qwen3ForCausalLM", ModelConfig.from_name(
        "tiny", vocab_size=300, qk_norm=True, head_dim=16, tie_embeddings=False,
        rope_scaling=RopeScaling(factor=8.0, original_context_length=16))),
}


def stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return dict(read_safetensors(*sorted(directory.glob("*.safetensors"))))


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer.train_bpe(["hello world, 你好 🎉 " * 20, "the quick brown fox"] * 10, vocab_size=300,
                              special_tokens=["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    return tok


@pytest.mark.parametrize("case", list(NATIVE))
def test_native_model_exports_to_a_directory_transformers_loads_with_equal_logits(tmp_path, tokenizer, case):
    architecture, cfg = NATIVE[case]
    ours = build_model(cfg).eval()
    save_model_dir(ours, tokenizer, tmp_path / "ckpt")
    to_hf(ToHFArgs(str(tmp_path / "ckpt"), str(tmp_path / "hf")))

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == architecture
    tokens, valid = padded_batch([12, 7, 3], vocab=300)
    with torch.no_grad():
        expected = hf(input_ids=tokens, attention_mask=valid.long()).logits
    assert max_diff_over_valid(ling_logits(ours, tokens, valid), expected, valid) <= 1e-4

    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "hello 你好 🎉   world<|im_end|>"
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                          "pad_token_id": tokenizer.pad_id}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_from_hf_then_to_hf_reproduces_every_tensor_bit_for_bit(tmp_path, variant):
    save_hf_model(variant, tmp_path / "orig")
    from_hf(FromHFArgs(str(tmp_path / "orig"), str(tmp_path / "ling")))
    to_hf(ToHFArgs(str(tmp_path / "ling"), str(tmp_path / "back")))
    original, back = stored_tensors(tmp_path / "orig"), stored_tensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    # The config maps back to the same model, and generation settings survive the trip.
    assert read_hf_config(tmp_path / "back") == read_hf_config(tmp_path / "orig")
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text()) == \
        json.loads((tmp_path / "orig" / "generation_config.json").read_text())


def test_bf16_conversion_both_ways(tmp_path):
    save_hf_model("qwen2-qkv-bias-tied", tmp_path / "orig")
    from_hf(FromHFArgs(str(tmp_path / "orig"), str(tmp_path / "ling"), dtype="bf16"))
    assert {t.dtype for t in stored_tensors(tmp_path / "ling").values()} == {torch.bfloat16}
    to_hf(ToHFArgs(str(tmp_path / "ling"), str(tmp_path / "back")))
    original, back = stored_tensors(tmp_path / "orig"), stored_tensors(tmp_path / "back")
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor.to(torch.bfloat16)), name
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_sharded_checkpoints_load_and_export(tmp_path):
    hf = save_hf_model("llama3-rope-scaling-tied", tmp_path / "orig", max_shard_size="20KB")
    assert (tmp_path / "orig" / "model.safetensors.index.json").exists()
    ours, _ = load_checkpoint(tmp_path / "orig")
    tokens, valid = padded_batch([8, 5])
    with torch.no_grad():
        expected = hf(input_ids=tokens, attention_mask=valid.long()).logits
    assert max_diff_over_valid(ling_logits(ours.eval(), tokens, valid), expected, valid) <= 1e-4

    to_hf(ToHFArgs(str(tmp_path / "orig"), str(tmp_path / "out"), max_shard_size="30KB"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert sorted(index["weight_map"]) == sorted(stored_tensors(tmp_path / "orig"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        again = reloaded(input_ids=tokens, attention_mask=valid.long()).logits
    assert max_diff_over_valid(again, expected, valid) == 0.0


def test_gpt2_checkpoint_saved_without_the_transformer_prefix_loads(tmp_path):
    """Like the original `gpt2` on the hub: base-model names and causal-mask buffers."""
    hf = save_hf_model("gpt2", tmp_path)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours, _ = load_checkpoint(tmp_path)
    tokens, valid = padded_batch([6])
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
    assert max_diff_over_valid(ling_logits(ours.eval(), tokens, valid), expected, valid) <= 1e-4


# ---- unsupported architectures and options: clear errors naming what is supported ------------
def _edit_config(directory: Path, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("variant, changes, message", [
    ("mistral", {"sliding_window": 16}, r"sliding-window attention \(sliding_window=16 < max_position_embeddings=64\)"
                                        r" is not supported .*full attention"),
    ("qwen2-qkv-bias-tied", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
                             "layer_types": None}, "sliding-window attention"),
    ("llama2-untied", {"rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling of type 'linear' is not supported .*'llama3'"),
    ("llama2-untied", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope_scaling of type 'yarn'"),
    ("llama2-untied", {"partial_rotary_factor": 0.5}, "partial rotary embeddings"),
    ("llama2-untied", {"attention_bias": True}, "attention_bias=True with mlp_bias=False"),
    ("llama2-untied", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported .*'silu'"),
    ("qwen3-tied", {"attention_bias": True}, "attention_bias=true is not supported"),
    ("gpt2", {"activation_function": "relu"}, "activation_function 'relu' is not supported .*gelu_new"),
    ("llama2-untied", {"architectures": ["PhiForCausalLM"]},
     r"architecture PhiForCausalLM is not supported \(ling supports GPT2LMHeadModel, LlamaForCausalLM, "
     r"MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM\)"),
    ("llama2-untied", {"quantization_config": {"quant_method": "gptq"}}, r"quantized checkpoints \(gptq\)"),
])
def test_unsupported_options_are_clear_errors(tmp_path, variant, changes, message):
    save_hf_model(variant, tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(LingError, match=message):
        load_checkpoint(tmp_path)


def test_sliding_window_that_never_takes_effect_is_accepted(tmp_path):
    save_hf_model("mistral", tmp_path)  # sliding_window == max_position_embeddings
    load_checkpoint(tmp_path)


# ---- bad input through the CLI: one clear line, exit 1, nothing written ------------------------
def run_ling(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ling", *map(str, args)], capture_output=True, text=True)


def assert_clean_failure(proc: subprocess.CompletedProcess, out: Path, *fragments: str):
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []  # no temp dir left


def _remove_tensor(directory: Path, name: str):
    tensors = load_file(directory / "model.safetensors")
    del tensors[name]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _add_tensor(directory: Path, name: str):
    tensors = load_file(directory / "model.safetensors")
    tensors[name] = torch.zeros(3)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _corrupt_header(directory: Path):
    data = bytearray((directory / "model.safetensors").read_bytes())
    data[8:20] = b"not json at!"
    (directory / "model.safetensors").write_bytes(bytes(data))


BAD_INPUTS = {
    "missing config.json": (lambda d: (d / "config.json").unlink(), ["missing config.json"]),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), ["missing weights"]),
    "shape mismatch": (lambda d: _edit_config(d, intermediate_size=50),
                       ["'model.layers.0.mlp.gate_proj.weight' has shape (48, 32)", "expects (50, 32)"]),
    "missing tensor": (lambda d: _remove_tensor(d, "model.layers.1.self_attn.k_proj.weight"),
                       ["missing tensor(s) 'model.layers.1.self_attn.k_proj.weight'"]),
    "unexpected tensor": (lambda d: _add_tensor(d, "model.layers.0.extra.weight"),
                          ["unexpected tensor(s) 'model.layers.0.extra.weight'"]),
    "corrupt safetensors header": (_corrupt_header, ["model.safetensors: not a valid safetensors file"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_hf_input_fails_cleanly_through_the_cli(tmp_path, case):
    damage, fragments = BAD_INPUTS[case]
    save_hf_model("llama2-untied", tmp_path / "in")
    damage(tmp_path / "in")
    out = tmp_path / "out"
    assert_clean_failure(run_ling("convert", "from-hf", tmp_path / "in", out), out, *fragments)


def test_to_hf_of_a_model_matching_no_family_names_the_closest(tmp_path):
    cfg = dataclasses.replace(ModelConfig.from_name("tiny"), mlp="gelu")  # RoPE + RMSNorm + GELU: no HF family
    save_model_dir(build_model(cfg), None, tmp_path / "ckpt")
    out = tmp_path / "out"
    proc = run_ling("convert", "to-hf", tmp_path / "ckpt", out)
    assert_clean_failure(proc, out, "matches no Hugging Face family", "closest is LlamaForCausalLM",
                         "needs mlp='swiglu'")


def test_cli_round_trip_with_dtype_flags_prints_a_summary(tmp_path, capsys):
    save_hf_model("qwen3-qk-norm", tmp_path / "orig")
    assert cli.main(["convert", "from-hf", str(tmp_path / "orig"), str(tmp_path / "ling"), "--dtype", "bf16"]) == 0
    assert "ling checkpoint (qwen3" in capsys.readouterr().out
    assert cli.main(["convert", "to-hf", str(tmp_path / "ling"), str(tmp_path / "back"), "--dtype", "fp32"]) == 0
    summary = capsys.readouterr().out
    assert "Qwen3ForCausalLM" in summary and "float32" in summary
    assert {t.dtype for t in stored_tensors(tmp_path / "back").values()} == {torch.float32}


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    save_hf_model("gpt2", tmp_path / "orig")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert cli.main(["convert", "from-hf", str(tmp_path / "orig"), str(tmp_path / "out")]) == 1
    assert "already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    # --overwrite replaces a checkpoint ling wrote, not a folder of the user's.
    assert cli.main(["convert", "from-hf", str(tmp_path / "orig"), str(tmp_path / "out"), "--overwrite"]) == 1
    assert "does not hold a checkpoint ling wrote" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "out" / "keep.txt").unlink()
    assert cli.main(["convert", "from-hf", str(tmp_path / "orig"), str(tmp_path / "out")]) == 0  # empty: fine
    assert cli.main(["convert", "from-hf", str(tmp_path / "orig"), str(tmp_path / "out"), "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "generation_config.json",
                                                                     "model.safetensors"]
