"""GGUF export and import: transformers' own GGUF loader as the oracle, round trips, the
tokenizer llama.cpp would rebuild, `.gguf` files wherever a checkpoint goes, bad input."""

import json
import logging

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from ling import cli
from ling.checkpoint import load_checkpoint, save_model_dir
from ling.config import ModelConfig, RopeScaling
from ling.data.sft_encode import CHATML_TEMPLATE, install_chatml
from ling.errors import LingError
from ling.gguf.convert import FromGGUFArgs, ToGGUFArgs, from_gguf, to_gguf
from ling.gguf.reader import GGUFFile, load_gguf
from ling.gguf.vocab import LLAMA3_SPLIT, QWEN2_SPLIT
from ling.gguf.writer import save_gguf
from ling.model import build_model
from ling.tokenizer import Tokenizer, _default_config
from tests.hf_models import randomize
from tests.scripted import SCRIPT, byte_tokenizer, scripted_model

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
logging.getLogger("gguf").setLevel(logging.ERROR)

VOCAB = 320
_C = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
          max_position_embeddings=64)
# One HF model per family, shaped within what transformers' GGUF loader reads back (it takes
# Qwen3's head_dim as 128 and GPT-2's context as 1024 and MLP as 4 x width, whatever the file says).
FAMILIES = {
    "llama-gqa-untied": lambda: LlamaConfig(**_C, num_key_value_heads=2, tie_word_embeddings=False),
    "llama-mqa-explicit-head-dim": lambda: LlamaConfig(**_C, num_key_value_heads=1, head_dim=32),
    "mistral": lambda: MistralConfig(**_C, num_key_value_heads=2, head_dim=12, sliding_window=None),
    "qwen2-tied": lambda: Qwen2Config(**_C, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**{**_C, "num_attention_heads": 2}, num_key_value_heads=1, head_dim=128,
                                 tie_word_embeddings=False),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=1024),
}
TEXT = "Hello world! 你好，世界 🎉🚀 café naïve Zürich — def f(x):\n    return x**2  # ok\n\n\tI've 3.14159 ١٢٣  "
CORPUS = [TEXT * 3, "the quick brown fox jumps over the lazy dog. " * 20, "你好世界，日本語のテキスト 한국어 " * 10,
          "for i in range(10):\n    print(i ** 2)\n" * 10]
TOKENS = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bpe():
    tok = Tokenizer.train_bpe(CORPUS, vocab_size=300)
    install_chatml(tok)
    return tok


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def export(tmp_path, variant, bpe, dtype, randomized=True):
    """HF model → ling (from its directory) → GGUF; returns the HF model and the GGUF's directory."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(FAMILIES[variant]()).eval()
    if randomized:  # every weight random: a mapping mistake anywhere changes the logits
        randomize(hf)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_checkpoint(tmp_path / "hf")
    save_gguf(model, bpe, tmp_path / f"{dtype}.gguf", dtype)
    return hf, tmp_path


def transformers_gguf(directory, dtype):
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=f"{dtype}.gguf", dtype=torch.float32).eval()


def rounded_as_stored(hf, dtype):
    """`hf` with every matrix rounded as a `dtype` GGUF file stores it (vectors stay float32)."""
    conv1d = isinstance(hf.config, GPT2Config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() != 2:
                continue
            rows = p.t() if conv1d and ".h." in name else p  # GPT-2's Conv1D keeps (in, out)
            if dtype == "f16" or (dtype == "q8_0" and rows.shape[1] % 32):
                rounded = rows.half().float()
            elif dtype == "bf16":
                rounded = rows.bfloat16().float()
            else:
                qtype = gguf.GGMLQuantizationType.Q8_0
                rounded = torch.from_numpy(gguf.dequantize(gguf.quantize(rows.numpy(), qtype), qtype))
            rows.copy_(rounded)
    return hf


@pytest.mark.parametrize("variant", list(FAMILIES))
def test_f32_export_loads_in_transformers_with_the_same_logits(tmp_path, bpe, variant):
    hf, directory = export(tmp_path, variant, bpe, "f32")
    torch.testing.assert_close(hf_logits(transformers_gguf(directory, "f32")), hf_logits(hf))


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("variant", list(FAMILIES))
def test_f16_bf16_q8_0_exports_differ_from_the_original_only_by_their_rounding(tmp_path, bpe, variant, dtype):
    hf, directory = export(tmp_path, variant, bpe, dtype)
    torch.testing.assert_close(hf_logits(transformers_gguf(directory, dtype)), hf_logits(rounded_as_stored(hf, dtype)))


@pytest.mark.parametrize("variant", list(FAMILIES))
def test_q8_0_changes_the_logits_of_an_initialised_model_by_under_2_percent(tmp_path, bpe, variant):
    """The bound docs/gguf.md states (measured at most 1.5% on these models)."""
    hf, directory = export(tmp_path, variant, bpe, "q8_0", randomized=False)
    expected = hf_logits(hf)
    error = (hf_logits(transformers_gguf(directory, "q8_0")) - expected).abs().max()
    assert 0 < error <= 0.02 * expected.abs().max()


# ---- ling's own reader: options transformers' GGUF loader does not read --------------------
NATIVE = {
    "llama-biases": ModelConfig.from_name("tiny", vocab_size=VOCAB, n_embd=64, bias="all", tie_embeddings=False),
    "llama3-rope-scaling": ModelConfig.from_name("tiny", vocab_size=VOCAB, n_embd=64, n_head=2, rope_theta=500000.0,
                                                 rope_scaling=RopeScaling(factor=8.0, high_freq_factor=16.0,
                                                                          original_context_length=256)),
    "qwen3-small-heads": ModelConfig.from_name("tiny", vocab_size=VOCAB, n_embd=64, qk_norm=True,
                                               head_dim=16),
    "gpt2-short-context-no-biases": ModelConfig(vocab_size=VOCAB, context_length=64, n_layer=2, n_embd=64, n_head=4,
                                                mlp_hidden=96, norm_bias=False),
}


@pytest.mark.parametrize("case", list(NATIVE))
def test_ling_reads_back_an_f32_export_exactly(tmp_path, bpe, case):
    model = randomize(build_model(NATIVE[case])).eval()
    save_gguf(model, bpe, tmp_path / "m.gguf", "f32")
    back, tokenizer = load_gguf(tmp_path / "m.gguf")
    assert back.cfg.rope_scaling == NATIVE[case].rope_scaling
    with torch.no_grad():
        assert torch.equal(back(TOKENS), model(TOKENS))
    assert tokenizer.encode(TEXT) == bpe.encode(TEXT)


def test_llama3_scaling_travels_as_llama_cpp_rope_factors(tmp_path, bpe):
    cfg = NATIVE["llama3-rope-scaling"]
    save_gguf(build_model(cfg), bpe, tmp_path / "m.gguf", "f16")
    factors = GGUFFile(tmp_path / "m.gguf").read("rope_freqs.weight")
    # llama.cpp's convert_hf_to_gguf.py: 1 for short wavelengths, the factor for long ones, smooth between
    wavelen = 2 * np.pi * 500000.0 ** (np.arange(0, 32, 2) / 32)
    low, high = 256 / 1.0, 256 / 16.0
    smooth = (256 / wavelen - 1) / (16 - 1)
    expected = np.where(wavelen < high, 1, np.where(wavelen > low, 8, 1 / ((1 - smooth) / 8 + smooth)))
    np.testing.assert_allclose(factors.numpy(), expected, rtol=1e-6)


# ---- round trips -------------------------------------------------------------------------
def gguf_contents(path):
    file = GGUFFile(path)
    tensors = {name: (t.tensor_type, tuple(t.shape.tolist()), t.data.tobytes()) for name, t in file.tensors.items()}
    return file.metadata, tensors


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_gguf_to_ling_to_gguf_keeps_every_tensor_and_key(tmp_path, bpe, dtype):
    cfg = ModelConfig.from_name("llama-110m", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, mlp_hidden=96,
                                vocab_size=VOCAB, tie_embeddings=False)
    save_gguf(build_model(cfg), bpe, tmp_path / "a.gguf", dtype)
    from_gguf(FromGGUFArgs(str(tmp_path / "a.gguf"), str(tmp_path / "ckpt")))
    to_gguf(ToGGUFArgs(str(tmp_path / "ckpt"), str(tmp_path / "b.gguf"), dtype=dtype))
    (meta_a, tensors_a), (meta_b, tensors_b) = gguf_contents(tmp_path / "a.gguf"), gguf_contents(tmp_path / "b.gguf")
    assert meta_a == meta_b
    assert meta_a["general.name"] == "llama-110m" and meta_a["tokenizer.chat_template"] == CHATML_TEMPLATE.replace(
        "{% generation %}", "").replace("{% endgeneration %}", "")
    assert tensors_a.keys() == tensors_b.keys() and len(tensors_a) == 3 + 2 * 9
    for name in tensors_a:
        assert tensors_a[name] == tensors_b[name], name


def test_quantised_types_choose_as_llama_cpp_does(tmp_path, bpe):
    cfg = ModelConfig.from_name("tiny", vocab_size=VOCAB, n_embd=64, mlp_hidden=80, tie_embeddings=True)
    save_gguf(build_model(cfg), bpe, tmp_path / "q.gguf", "q4_0")
    file = GGUFFile(tmp_path / "q.gguf")
    kinds = {name: file.type_name(name) for name in file.tensors}
    assert kinds["token_embd.weight"] == "Q8_0"  # the tied LM head
    assert kinds["blk.0.attn_q.weight"] == "Q4_0" and kinds["blk.0.ffn_up.weight"] == "Q4_0"
    assert kinds["blk.0.ffn_down.weight"] == "F16"  # rows of 80 are not whole 32-value blocks
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    assert file.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert file.metadata["general.quantization_version"] == gguf.GGML_QUANT_VERSION


# ---- tokenizers --------------------------------------------------------------------------
def trained(pre_tokenizer, normalizer=None, ignore_merges=False, bos=False) -> Tokenizer:
    """A byte-level BPE tokenizer with a given pre-tokenizer, as Llama 3 / Qwen2 build theirs."""
    backend = HFTokenizer(models.BPE(ignore_merges=ignore_merges))
    backend.normalizer, backend.pre_tokenizer, backend.decoder = normalizer, pre_tokenizer, decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                               special_tokens=[("<|bos|>", 0)])
    return Tokenizer(backend, _default_config())


def split_then_bytes(pattern):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


TOKENIZERS = {
    "gpt-2": lambda: Tokenizer.train_bpe(CORPUS, vocab_size=300),
    "llama-bpe": lambda: trained(split_then_bytes(LLAMA3_SPLIT), ignore_merges=True, bos=True),
    "qwen2": lambda: trained(split_then_bytes(QWEN2_SPLIT), normalizer=normalizers.NFC()),
    "smollm": lambda: trained(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])),
}


@pytest.mark.parametrize("pre", list(TOKENIZERS))
def test_tokenizer_rebuilt_from_gguf_encodes_cjk_emoji_code_and_accents_to_the_same_ids(tmp_path, pre):
    original = TOKENIZERS[pre]()
    cfg = ModelConfig.from_name("tiny", vocab_size=VOCAB)
    save_gguf(build_model(cfg), original, tmp_path / "m.gguf", "f16")
    file = GGUFFile(tmp_path / "m.gguf")
    assert file.metadata["tokenizer.ggml.model"] == "gpt2" and file.metadata["tokenizer.ggml.pre"] == pre
    assert file.metadata["tokenizer.ggml.add_bos_token"] == (pre == "llama-bpe")
    _, rebuilt = load_gguf(tmp_path / "m.gguf")
    expected = original.encode(TEXT)
    assert rebuilt.encode(TEXT) == expected
    assert rebuilt.decode(expected) == original.decode(expected)
    # transformers' GGUF tokenizer — built from the same keys by its own code — agrees
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert theirs(TEXT)["input_ids"][-len(original.encode(TEXT, add_special_tokens=False)):] == \
        original.encode(TEXT, add_special_tokens=False)


def test_special_tokens_and_chat_template_survive_the_round_trip(tmp_path, bpe):
    save_gguf(build_model(ModelConfig.from_name("tiny", vocab_size=VOCAB)), bpe, tmp_path / "m.gguf", "f16")
    meta = GGUFFile(tmp_path / "m.gguf").metadata
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == VOCAB and tokens[meta["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert [types[bpe.token_to_id(t)] for t in ("<|bos|>", "<|im_start|>", "<|im_end|>")] == [3, 3, 3]  # CONTROL
    assert tokens[-1] == f"[PAD{VOCAB - 1}]" and types[-1] == 5  # ids the tokenizer does not use: UNUSED
    _, rebuilt = load_gguf(tmp_path / "m.gguf")
    messages = [{"role": "user", "content": "你好 🎉"}, {"role": "assistant", "content": "café"}]
    assert rebuilt.apply_chat_template(messages) == bpe.apply_chat_template(messages)
    assert rebuilt.encode(rebuilt.apply_chat_template(messages)) == bpe.encode(bpe.apply_chat_template(messages))
    assert (rebuilt.bos_id, rebuilt.eos_id, rebuilt.pad_id) == (bpe.bos_id, bpe.eos_id, bpe.pad_id)


# ---- a .gguf wherever a checkpoint goes ---------------------------------------------------
@pytest.fixture(scope="module")
def scripted_gguf(tmp_path_factory):
    """A GGUF whose greedy continuation of 'A' is the rest of SCRIPT, then EOS."""
    tokenizer = byte_tokenizer()
    model = scripted_model(tokenizer, tokenizer.encode(SCRIPT) + [tokenizer.eos_id])
    path = tmp_path_factory.mktemp("gguf") / "scripted.gguf"
    save_gguf(model, tokenizer, path, "f32")
    return path


def test_generate_and_eval_open_a_gguf_file(scripted_gguf, tmp_path, capsys):
    assert cli.main(["generate", str(scripted_gguf), "--prompt", "A", "--temperature", "0", "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out == SCRIPT + "\n"
    (tmp_path / "t.txt").write_text(SCRIPT)
    assert cli.main(["eval", str(scripted_gguf), "--data", str(tmp_path / "t.txt"), "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_a_lora_run_is_merged_before_export(tmp_path, bpe):
    from ling.adapter_dir import save_adapter
    from ling.lora import LoRAConfig, apply_lora

    base = build_model(ModelConfig.from_name("tiny", vocab_size=VOCAB, n_embd=64)).eval()
    save_model_dir(base, bpe, tmp_path / "base")
    config = LoRAConfig(rank=4, dropout=0.0)
    apply_lora(base, config)
    with torch.no_grad():
        for p in base.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        expected = base(TOKENS)
    save_adapter(base, config, tmp_path / "run", base=str(tmp_path / "base"), train_token_ids=[])
    bpe.save(tmp_path / "run")
    to_gguf(ToGGUFArgs(str(tmp_path / "run"), str(tmp_path / "merged.gguf"), dtype="f32"))
    merged, _ = load_checkpoint(tmp_path / "merged.gguf")
    with torch.no_grad():
        torch.testing.assert_close(merged(TOKENS), expected)


def test_cli_summaries_and_from_gguf_dtype(tmp_path, bpe, capsys):
    save_model_dir(build_model(ModelConfig.from_name("tiny", vocab_size=VOCAB, n_embd=64)), bpe, tmp_path / "ckpt")
    assert cli.main(["convert", "to-gguf", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf"), "--dtype", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 'm.gguf'}: tiny (") and ", q8_0, 20 tensors, " in out
    assert cli.main(["convert", "from-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "back"), "--dtype", "bf16"]) == 0
    assert "bfloat16, tokenizer with chat template" in capsys.readouterr().out
    assert json.loads((tmp_path / "back" / "config.json").read_text())["name"] == "tiny"
    model, _ = load_checkpoint(tmp_path / "back")
    assert next(model.parameters()).dtype == torch.bfloat16


# ---- bad input ---------------------------------------------------------------------------
def test_what_ling_refuses_to_export_is_one_clear_line(tmp_path, bpe, capsys):
    char = Tokenizer.train_char(["hello world"])
    save_model_dir(build_model(ModelConfig.from_name("tiny", vocab_size=char.vocab_size)), char, tmp_path / "char")
    save_model_dir(build_model(ModelConfig(vocab_size=VOCAB, mlp="swiglu")), bpe, tmp_path / "odd")  # no family
    save_model_dir(build_model(ModelConfig.from_name("tiny", vocab_size=VOCAB)), bpe, tmp_path / "ok")
    (tmp_path / "exists.gguf").write_bytes(b"x")
    cases = [
        (["char", "c.gguf"], "character-level tokenizer has no GGUF equivalent"),
        (["odd", "o.gguf"], "matches no Hugging Face family"),
        (["ok", "exists.gguf"], "exists.gguf: already exists (pass --overwrite to replace it)"),
        (["ok", "q.gguf", "--dtype", "q5_k"], "--dtype q5_k is not supported (choose one of f32, f16, bf16, q8_0, q4_0)"),
    ]
    for argv, message in cases:
        argv = [str(tmp_path / argv[0]), str(tmp_path / argv[1]), *argv[2:]]
        assert cli.main(["convert", "to-gguf", *argv]) != 0
        err = capsys.readouterr().err
        assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["char", "exists.gguf", "odd", "ok"]  # nothing half-written
    with pytest.raises(LingError, match="choose one of f32, f16, bf16, q8_0, q4_0"):
        save_gguf(build_model(ModelConfig.from_name("tiny", vocab_size=VOCAB)), bpe, tmp_path / "x.gguf", "q5_k")


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(tmp_path):
    odd = trained(pre_tokenizers.ByteLevel(add_prefix_space=True))
    with pytest.raises(LingError, match=r"no llama.cpp pre-tokenizer matches .*ling exports these: gpt-2 \(GPT-2"):
        save_gguf(build_model(ModelConfig.from_name("tiny", vocab_size=VOCAB)), odd, tmp_path / "m.gguf")
    spm = HFTokenizer(models.BPE(vocab={"<unk>": 0, "▁a": 1}, merges=[], byte_fallback=True, unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(LingError, match=r"SentencePiece-style BPE tokenizer \(byte fallback: Llama 2"):
        save_gguf(build_model(ModelConfig.from_name("tiny", vocab_size=VOCAB)), Tokenizer(spm), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def write_gguf(path, arch="llama", tokenizer_model=None):
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    if tokenizer_model:
        writer.add_tokenizer_model(tokenizer_model)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_what_ling_refuses_to_import_is_one_clear_line(tmp_path, bpe, capsys):
    save_gguf(build_model(ModelConfig.from_name("tiny", vocab_size=VOCAB)), bpe, tmp_path / "good.gguf", "f16")
    data = (tmp_path / "good.gguf").read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) - 1000])
    (tmp_path / "short.gguf").write_bytes(data[:100])
    (tmp_path / "not.gguf").write_text("hello, I am a text file")
    write_gguf(tmp_path / "phi3.gguf", arch="phi3")
    write_gguf(tmp_path / "spm.gguf", tokenizer_model="llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file").write_text("x")
    cases = [
        ("truncated.gguf", "truncated.gguf: not a readable GGUF file, truncated or corrupt"),
        ("short.gguf", "short.gguf: not a readable GGUF file, truncated or corrupt"),
        ("not.gguf", "not.gguf: not a GGUF file (it starts with b'hell'"),
        ("phi3.gguf", "GGUF architecture 'phi3' is not supported (ling reads gpt2, llama, qwen2, qwen3)"),
        ("spm.gguf", "tokenizer.ggml.model 'llama' is not supported (ling reads byte-level BPE, 'gpt2'"),
    ]
    for name, message in cases:
        assert cli.main(["convert", "from-gguf", str(tmp_path / name), str(tmp_path / "ckpt")]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert cli.main(["convert", "from-gguf", str(tmp_path / "good.gguf"), str(tmp_path / "out")]) == 1
    assert "already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path / "not.gguf"), "--prompt", "A"]) == 1
    assert "not.gguf: not a GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_checkpoint_loading_imports_no_training_serving_or_evaluation():
    import subprocess
    import sys

    code = ("import sys, ling.checkpoint; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('ling.') and m.count('.') >= 1}))")
    rooms = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                       .stdout.replace("'", '"'))
    assert not {"train", "serve", "infer", "eval", "cli", "data"} & set(rooms), rooms


def test_finetune_from_a_gguf_base_and_export_the_lora_run_for_llama_cpp(tmp_path, capsys):
    from ling.data.synthetic import make_examples, write_jsonl
    from ling.train.config import TrainConfig
    from ling.train.finetune import FinetuneArgs, run_finetune

    tok = Tokenizer.train_bpe(CORPUS + ["Reverse the word. abcdefghijklmnopqrstuvwxyz"], vocab_size=300)
    save_gguf(build_model(ModelConfig.from_name("tiny", vocab_size=VOCAB, n_embd=64)), tok, tmp_path / "base.gguf", "q8_0")
    write_jsonl(make_examples("reverse", 40), tmp_path / "rev.jsonl", "messages")
    train = TrainConfig(max_steps=3, batch_tokens=256, micro_batch=4, warmup_steps=1, eval_every=3, eval_batches=1,
                        precision="fp32", seed=0)
    run_finetune(FinetuneArgs(base=str(tmp_path / "base.gguf"), data=str(tmp_path / "rev.jsonl"), out=str(tmp_path / "run"),
                              method="lora", device="cpu", max_seq_len=64, train=train), show_summary=False)
    assert cli.main(["convert", "to-gguf", str(tmp_path / "run" / "latest"), str(tmp_path / "chat.gguf")]) == 0
    expected, expected_tok = load_checkpoint(tmp_path / "run" / "latest")  # base.gguf + adapter, merged
    exported, exported_tok = load_checkpoint(tmp_path / "chat.gguf", dtype="fp32")
    meta = GGUFFile(tmp_path / "chat.gguf").metadata
    assert "{% generation %}" not in meta["tokenizer.chat_template"] and "<|im_start|>" in meta["tokenizer.chat_template"]
    assert meta["tokenizer.ggml.tokens"][meta["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    messages = [{"role": "user", "content": "abc"}]
    prompt = exported_tok.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == expected_tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = torch.tensor([exported_tok.encode(prompt)])
    with torch.no_grad():  # f16 matrices: within f16 rounding of the merged model
        torch.testing.assert_close(exported(ids), expected.float()(ids), rtol=0.02, atol=0.02)


def test_without_the_gguf_package_only_gguf_files_fail_and_say_how_to_install_it(tmp_path, bpe, monkeypatch):
    import sys

    from ling.gguf.library import require_gguf

    save_gguf(build_model(ModelConfig.from_name("tiny", vocab_size=VOCAB)), bpe, tmp_path / "m.gguf", "f16")
    save_model_dir(build_model(ModelConfig.from_name("tiny", vocab_size=VOCAB)), bpe, tmp_path / "ckpt")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    require_gguf.cache_clear()
    try:
        load_checkpoint(tmp_path / "ckpt")
        with pytest.raises(LingError, match=r"the gguf package: pip install -e '\.\[gguf\]' \(from the ling checkout\)"):
            load_checkpoint(tmp_path / "m.gguf")
    finally:
        require_gguf.cache_clear()
