"""`ling` — the command-line entry point. It only wires: every command is a typed dataclass
of arguments plus a function, living in the module that does the work.

Each dataclass is the single source of the command's flags (through `tyro`), of the YAML
files given with `--config` and of `--print-config`. An unknown flag or YAML key is an
error naming the closest valid one. A `LingError` anywhere becomes one line on stderr and
exit status 1 — never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import tyro
import yaml

from ling.config_files import load_yaml_config, model_templates, required_placeholder
from ling.dataclass_io import closest, to_dict
from ling.errors import LingError


@dataclass(frozen=True)
class Command:
    """Where a command lives: `module:ArgsClass:function`, and a one-line description."""

    target: str
    help: str

    def load(self):
        module_name, args_name, fn_name = self.target.split(":")
        module = importlib.import_module(module_name)
        return getattr(module, args_name), getattr(module, fn_name)


# Commands are imported only when run, so `ling --help` stays fast.
COMMANDS: dict[str, Command | dict[str, Command]] = {
    "prepare": Command("ling.data.prepare:PrepareArgs:prepare", "tokenize text, jsonl, parquet or URLs into a dataset directory"),
    "pretrain": Command("ling.train.pretrain:PretrainArgs:pretrain", "pretrain a model on a prepared dataset"),
    "quickstart": Command("ling.quickstart:QuickstartArgs:quickstart",
                          "prepare the builtin corpus, pretrain a small model for ~2 minutes, sample from it"),
    "finetune": Command("ling.train.finetune:FinetuneArgs:finetune", "fine-tune a model: full or LoRA, chat/instruction SFT or a task head"),
    "merge": Command("ling.merge:MergeArgs:merge", "fold a LoRA adapter into its base model"),
    "eval": Command("ling.eval.evaluate:EvalArgs:evaluate", "loss / perplexity / bits-per-byte, or a classifier's accuracy"),
    "generate": Command("ling.infer.generate:GenerateArgs:generate", "generate text from a checkpoint (one prompt or a file)"),
    "chat": Command("ling.infer.chat:ChatArgs:chat", "chat with a checkpoint in the terminal"),
    "convert": {
        "from-hf": Command("ling.hf.convert:FromHFArgs:from_hf", "Hugging Face model directory → ling checkpoint"),
        "to-hf": Command("ling.hf.convert:ToHFArgs:to_hf", "ling checkpoint → Hugging Face model directory"),
        "to-gguf": Command("ling.gguf.convert:ToGGUFArgs:to_gguf", "checkpoint → GGUF file (llama.cpp, Ollama)"),
        "from-gguf": Command("ling.gguf.convert:FromGGUFArgs:from_gguf", "GGUF file → ling checkpoint"),
    },
    "serve": Command("ling.serve.server:ServeArgs:serve", "serve a checkpoint: OpenAI-compatible API + chat page"),
    "sweep": Command("ling.sweep.command:SweepArgs:sweep", "search a training command's hyper-parameters with Optuna"),
}


def usage() -> str:
    lines = ["usage: ling COMMAND [--config FILE.yaml] [--print-config] [flags...]", "", "commands:"]
    for name, entry in COMMANDS.items():
        if isinstance(entry, dict):
            for sub, cmd in entry.items():
                lines.append(f"  {name + ' ' + sub:<18} {cmd.help}")
        else:
            lines.append(f"  {name:<18} {entry.help}")
    lines += ["", "Run 'ling COMMAND --help' for a command's flags."]
    return "\n".join(lines)


def _resolve(argv: list[str]) -> tuple[str, Command, list[str]]:
    name = argv[0]
    entry = COMMANDS.get(name)
    if entry is None:
        hint = closest(name, list(COMMANDS))
        raise LingError(f"unknown command '{name}'" + (f"; did you mean '{hint}'?" if hint else "") + " (see 'ling --help')")
    if isinstance(entry, Command):
        return name, entry, argv[1:]
    subs = ", ".join(entry)
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        raise LingError(f"'ling {name}' needs a subcommand: {subs}")
    sub = entry.get(argv[1])
    if sub is None:
        hint = closest(argv[1], list(entry))
        raise LingError(f"unknown subcommand 'ling {name} {argv[1]}'" + (f"; did you mean '{hint}'?" if hint else "") + f" ({subs})")
    return f"{name} {argv[1]}", sub, argv[2:]


def _split_config_flags(args: list[str]) -> tuple[list[str], bool, list[str]]:
    """Pull `--config FILE` (repeatable, later files win) and `--print-config` out of argv."""
    configs, rest, print_config = [], [], False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--print-config", "--print_config"):
            print_config = True
        elif arg == "--config":
            if i + 1 >= len(args):
                raise LingError("--config needs a YAML file")
            configs.append(args[i + 1])
            i += 1
        elif arg.startswith("--config="):
            configs.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return configs, print_config, rest


def parse(name: str, cls, argv: list[str], description: str):
    """Parse argv for one command: YAML files first, then flags on top."""
    configs, print_config, rest = _split_config_flags(argv)
    base = model_templates(cls, required_placeholder(cls), configs, rest)
    default = model_templates(cls, load_yaml_config(cls, configs, base=base))
    args = tyro.cli(cls, args=rest, default=default, prog=f"ling {name}", description=description)
    return args, print_config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    try:
        name, command, rest = _resolve(argv)
        cls, fn = command.load()
        args, print_config = parse(name, cls, rest, command.help)
        if print_config:
            print(yaml.safe_dump(to_dict(args), sort_keys=False, allow_unicode=True), end="")
            return 0
        result = fn(args)
        return result if isinstance(result, int) else 0
    except LingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
