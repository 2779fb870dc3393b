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
import inspect
import json
import sys
import types
import typing
import warnings
from dataclasses import dataclass

import tyro
import tyro._strings
import yaml

import ling
from ling.config_files import load_yaml_config, model_templates, required_placeholder
from ling.dataclass_io import closest, from_dict, integral, load_yaml, to_dict
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
    "eval": Command("ling.eval.evaluate:EvalArgs:evaluate", "loss / perplexity / bits-per-byte, a classifier's accuracy, or lm-eval tasks (--tasks)"),
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


# ---- how tyro reads flags -------------------------------------------------------------
REGISTRY = tyro.constructors.ConstructorRegistry()


@REGISTRY.primitive_rule
def _integers(info: tyro.constructors.PrimitiveTypeInfo):
    """An int flag takes every way of writing a whole number: 1000, 1_000, 1e3."""
    if info.type is not int:
        return None
    return tyro.constructors.PrimitiveConstructorSpec(
        nargs=1, metavar="INT", instance_from_str=lambda args: integral(args[0]),
        is_instance=lambda x: isinstance(x, int) and not isinstance(x, bool), str_from_instance=lambda x: [str(x)])


@REGISTRY.primitive_rule
def _optional_sections(info: tyro.constructors.PrimitiveTypeInfo):
    """An optional nested dataclass (`model.rope_scaling`) is one flag taking a YAML mapping
    or None, rather than a pair of subcommands in every usage line and error box."""
    if typing.get_origin(info.type) not in (typing.Union, types.UnionType):
        return None
    args = [a for a in typing.get_args(info.type) if a is not type(None)]
    if len(args) != 1 or len(typing.get_args(info.type)) != 2 or not dataclasses.is_dataclass(args[0]):
        return None
    cls = args[0]
    keys = ", ".join(f.name for f in dataclasses.fields(cls))

    def parse(values: list[str]):
        text = values[0]
        if text in ("None", "none", "null"):
            return None
        data = load_yaml(text)
        if not isinstance(data, dict):
            raise ValueError(f"expected None or a mapping such as '{{{keys.split(', ')[0]}: ...}}', got {text!r}")
        try:
            return from_dict(cls, data)
        except LingError as e:
            raise ValueError(str(e)) from None

    return tyro.constructors.PrimitiveConstructorSpec(
        nargs=1, metavar="{None}|YAML", instance_from_str=parse,
        is_instance=lambda x: x is None or isinstance(x, cls),
        str_from_instance=lambda x: ["None" if x is None else json.dumps(to_dict(x))])


def _one_paragraph_help(text: str) -> str:
    """tyro joins a docstring's lines before it removes their indentation, so every indented
    continuation line starts a new line of help; removing it first (`inspect.cleandoc`) gives
    paragraphs that the terminal's width wraps."""
    return _join_lines(inspect.cleandoc(text))


_join_lines = tyro._strings.remove_single_line_breaks


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
    options = dict(default=default, prog=f"ling {name}", description=description, registry=REGISTRY)
    tyro._strings.remove_single_line_breaks = _one_paragraph_help
    try:
        unknown = _unknown_flags(cls, rest, options)
        if unknown:
            raise LingError(unknown)
        args = tyro.cli(cls, args=rest, **options)
    finally:
        tyro._strings.remove_single_line_breaks = _join_lines
    return args, print_config


def _unknown_flags(cls, args: list[str], options: dict) -> str | None:
    """One line for the first flag the command does not have, with the closest one it has
    (tyro's own box also lists the typo's value as an option)."""
    flags = [arg.split("=", 1)[0] for arg in args if arg.startswith("--")]
    if not flags or "--help" in flags or "-h" in args:
        return None
    try:
        with warnings.catch_warnings():  # tyro's parser is the one place that knows every flag
            warnings.simplefilter("ignore", DeprecationWarning)
            parser = tyro.extras.get_parser(cls, **{k: v for k, v in options.items() if k != "description"})
    except Exception:  # noqa: BLE001 — a tyro without it: its own error box answers instead
        return None
    valid = [flag for flag in parser._option_string_actions if flag.startswith("--")]
    for flag in flags:
        if flag not in valid and flag.replace("_", "-") not in valid:
            hint = closest(flag[2:], [v[2:] for v in valid])
            return (f"unknown flag '{flag}'" + (f"; did you mean '--{hint}'?" if hint else "")
                    + f" (see '{options['prog']} --help')")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"ling {ling.__version__}")
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
