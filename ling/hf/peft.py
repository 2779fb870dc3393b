"""LoRA adapters in PEFT's format, for the Hugging Face export of the base model.

`save_peft_adapter` writes `adapter_config.json` + `adapter_model.safetensors` that
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HF_BASE), DIR)` loads
and that then computes what ling computes. Module names come from the family's own
module map (the one `ling convert to-hf` uses), so the adapter lands on the exported weights:

- fused `attn.qkv` → separate q_proj / k_proj / v_proj adapters (Llama, Mistral, Qwen), one per
  target, exactly as trained;
- GPT-2's `c_attn` is fused in HF too: the q/k/v adapters become one adapter of rank
  r × (number of q/k/v targets), A stacked and B block-diagonal on the targeted rows, with the
  alpha scaled alike (`rank_pattern` / `alpha_pattern`), which is the same update exactly;
- rows of new tokens trained in a LoRA run → PEFT's `trainable_token_indices`.

A base that grew new tokens must be grown the same way before loading the adapter:
`model.resize_token_embeddings(len(tokenizer))` (the trained rows then replace the new ones).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ling.atomic import set_default_mode
from ling.hf.checkpoint import export_family
from ling.lora import LoRAConfig, LoRALinear, token_rows
from ling.model import Transformer

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def peft_tensors(model: Transformer, config: LoRAConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """(PEFT-named tensors, the adapter_config.json fields that depend on them)."""
    family = export_family(model.cfg)
    modules = family.modules(model.cfg)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        hf = modules[name]
        if isinstance(hf, tuple):  # HF keeps q, k, v apart: one adapter each
            for target, hf_name in zip(("q", "k", "v"), hf):
                if target in module.slices:
                    tensors[f"{PREFIX}{hf_name}.lora_A.weight"] = module.lora_A[target]
                    tensors[f"{PREFIX}{hf_name}.lora_B.weight"] = module.lora_B[target]
            continue
        targets = list(module.slices)
        A = torch.cat([module.lora_A[t] for t in targets])
        B = torch.zeros(module.weight.shape[0], A.shape[0], dtype=A.dtype, device=A.device)
        for i, t in enumerate(targets):
            start, end = module.slices[t]
            B[start:end, i * config.rank:(i + 1) * config.rank] = module.lora_B[t]
        tensors[f"{PREFIX}{hf}.lora_A.weight"], tensors[f"{PREFIX}{hf}.lora_B.weight"] = A, B
        if len(targets) > 1:
            rank_pattern[hf] = A.shape[0]
            alpha_pattern[hf] = config.alpha * len(targets)
    trainable_tokens = {}
    for name, rows in token_rows(model).items():
        if name == "lm_head" and model.cfg.tie_embeddings:
            continue  # PEFT ties the head's rows to the embedding's itself
        hf = modules[name]
        trainable_tokens[hf.rsplit(".", 1)[-1]] = rows.ids.tolist()
        tensors[f"{PREFIX}{hf}.token_adapter.trainable_tokens_delta"] = rows.values
    target_modules = sorted({key[len(PREFIX):].rsplit(".lora_", 1)[0] for key in tensors if ".lora_" in key})
    fields = {
        "target_modules": target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": family.conv1d,
        "trainable_token_indices": trainable_tokens or None,
    }
    return tensors, fields


def save_peft_adapter(model: Transformer, config: LoRAConfig, directory: str | Path, base: str | None = None) -> None:
    """Write the adapter of a LoRA model as PEFT files; LingError if the base has no HF family."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, fields = peft_tensors(model, config)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(directory / PEFT_WEIGHTS),
              metadata={"format": "pt"})
    set_default_mode(directory / PEFT_WEIGHTS)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "bias": "none",
        "inference_mode": True,
        **fields,
    }
    (directory / PEFT_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
