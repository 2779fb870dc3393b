"""PEFT round trip: our adapter, loaded by peft onto the HF export of the base, gives our logits."""

import dataclasses

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ling.config import ModelConfig
from ling.data.sft_encode import install_chatml
from ling.hf.checkpoint import save_hf_dir
from ling.hf.peft import save_peft_adapter
from ling.lora import LoRAConfig, apply_lora
from ling.model import build_model
from ling.tokenizer import Tokenizer
from ling.vocab import resize_vocab

GPT2_LIKE = ModelConfig(name="gpt2", vocab_size=64, context_length=32, n_layer=2, n_embd=32, n_head=4, bias="all")
LLAMA_UNTIED = dataclasses.replace(ModelConfig.from_name("tiny", context_length=32), tie_embeddings=False)

CASES = {
    "llama-tied-all-targets": (ModelConfig.from_name("tiny", context_length=32), "q,k,v,o,gate,up,down"),
    "llama-untied-q-v": (LLAMA_UNTIED, "q,v"),
    "gpt2-fused-c_attn": (GPT2_LIKE, "q,v,o,up,down"),
    "gpt2-k-only": (GPT2_LIKE, "k"),
}


@pytest.mark.parametrize("case", CASES)
def test_peft_loads_our_adapter_onto_the_hf_export_and_gives_our_logits(tmp_path, case):
    cfg, targets = CASES[case]
    tok = Tokenizer.train_char(["abcdefghij klmnopqrstuvwxyz"])
    cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
    model = build_model(cfg)
    save_hf_dir(model, tok, tmp_path / "hf-base")  # what `ling convert to-hf` writes for the base

    new_ids = install_chatml(tok)  # a fine-tuning run on a template-less base adds tokens
    resize_vocab(model, tok.vocab_size)
    lora = LoRAConfig(rank=4, alpha=8, targets=targets)
    apply_lora(model, lora, new_ids)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    save_peft_adapter(model, lora, tmp_path / "adapter", base=str(tmp_path / "hf-base"))

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-base", torch_dtype=torch.float32)
    hf.resize_token_embeddings(tok.vocab_size)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    tokens = torch.tensor([[1, 5, new_ids[0], 7, 2, 9, new_ids[1], 3], [4, 4, 8, new_ids[1], 0, 6, 2, 1]])
    model.eval()
    with torch.no_grad():
        ours = model(tokens)
        theirs = peft_model(input_ids=tokens).logits
    torch.testing.assert_close(theirs, ours)


def test_lora_run_on_an_hf_base_gives_a_peft_adapter_for_that_very_directory(tmp_path):
    """The everyday path: a downloaded HF model, `ling finetune --method lora`, then PEFT."""
    from ling.checkpoint import load_checkpoint
    from ling.data.synthetic import make_examples, write_jsonl
    from ling.train.config import TrainConfig
    from ling.train.finetune import FinetuneArgs, run_finetune

    tok = Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyz .:R\n"])
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    save_hf_dir(build_model(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, context_length=64)), tok,
                tmp_path / "hf")
    write_jsonl(make_examples("reverse", 40), tmp_path / "d.jsonl", "messages")
    args = FinetuneArgs(base=str(tmp_path / "hf"), data=str(tmp_path / "d.jsonl"), out=str(tmp_path / "run"),
                        method="lora", max_seq_len=64, device="cpu", samples=0,
                        train=TrainConfig(max_steps=2, batch_tokens=256, micro_batch=4, lr=1e-2, warmup_steps=0,
                                          eval_every=2, eval_batches=1, precision="fp32"))
    run_finetune(args, show_summary=False)
    latest = tmp_path / "run" / "latest"
    ours, tokenizer = load_checkpoint(latest)
    assert tokenizer.chat_template == tok.chat_template and ours.cfg.vocab_size == tok.vocab_size  # no tokens added
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), latest).eval()
    tokens = torch.tensor([tokenizer.encode("user: abc")])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=tokens).logits, ours.eval()(tokens))
