"""`ling` — the command-line entry point. It only wires: every command is a typed dataclass
of arguments plus a function, living in the module that does the work.

Each dataclass is the single source of the command's flags (through `tyro`), of the YAML
files given with `--config` and of `--print-config`. An unknown flag or YAML key is an
error naming the closest valid one. A `LingError` anywhere becomes one line on stderr and
exit status 1 — never a traceback.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import tyro
import yaml

from ling.dataclass_io import closest, from_dict, to_dict
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
    "finetune": Command("ling.train.finetune:FinetuneArgs:finetune", "fine-tune a model: full or LoRA, chat/instruction SFT, a task head or preference tuning (DPO)"),
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


def _required_placeholder(cls):
    """An instance of `cls` whose required fields are tyro.MISSING (so YAML can fill them)."""
    values = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
        elif dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = _required_placeholder(hints[f.name])
        else:
            values[f.name] = tyro.MISSING
    obj = object.__new__(cls)  # skip __post_init__: placeholders are not yet valid values
    for k, v in values.items():
        object.__setattr__(obj, k, v)
    return obj


def _named_value(flag: str, args: list[str]) -> str | None:
    """The value given to `--flag VALUE` / `--flag=VALUE` in argv (the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _yaml_mapping(file: str) -> dict:
    path = Path(file)
    if not path.exists():
        raise LingError(f"{file}: config file not found")
    if path.is_dir():
        raise LingError(f"{file}: is a directory, not a YAML config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise LingError(f"{file}: not a YAML config file (not UTF-8 text)") from None
    except OSError as e:
        raise LingError(f"{file}: cannot read the config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise LingError(f"{file}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise LingError(f"{file}: expected a mapping of config keys at the top level")
    return data


def model_templates(cls, obj, files: list[str] = (), args: list[str] = ()):
    """`obj` with each `ModelConfig` field made a template (see `ling.config.unresolved`), so
    that YAML keys and flags such as `--model.n-embd` re-derive head_dim and friends. A
    preset named by `--FIELD.name PRESET` (flag, else YAML) replaces the field's default."""
    from ling.config import ModelConfig, unresolved

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if hints[f.name] is not ModelConfig:
            continue
        name = _named_value(f"--{f.name}.name", list(args))
        if name is None:
            for file in files:
                section = _yaml_mapping(file).get(f.name)
                if isinstance(section, dict) and "name" in section:
                    name = section["name"]
        if name is not None:
            value = ModelConfig() if name == "custom" else ModelConfig.from_name(str(name))
        else:
            value = getattr(obj, f.name)
        object.__setattr__(obj, f.name, unresolved(value))
    return obj


def load_yaml_config(cls, files: list[str], base=None):
    """Apply YAML files, in order, on top of `base` (or the class defaults)."""
    config = base if base is not None else _required_placeholder(cls)
    for file in files:
        config = from_dict(cls, _yaml_mapping(file), where=file, partial_base=config)
    return config


def parse(name: str, cls, argv: list[str], description: str):
    """Parse argv for one command: YAML files first, then flags on top."""
    configs, print_config, rest = _split_config_flags(argv)
    base = model_templates(cls, _required_placeholder(cls), configs, rest)
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
