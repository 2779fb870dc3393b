"""The `ling` CLI framework: command table, YAML configs, --print-config, errors."""

import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import yaml

from ling import cli
from ling.config import ModelConfig


@dataclass
class EchoArgs:
    """A stand-in command used to test the CLI machinery."""

    data: str
    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_name("tiny"))
    steps: int = 10
    max_new_tokens: int = 5


SEEN = []


def echo(args: EchoArgs):
    SEEN.append(args)


@pytest.fixture
def echo_command(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "echo", cli.Command("tests.test_cli:EchoArgs:echo", "echo the parsed args"))
    SEEN.clear()
    return SEEN


def test_flags_with_dashes_and_dotted_overrides(echo_command):
    assert cli.main(["echo", "--data", "d", "--model.n-layer", "3", "--max-new-tokens", "7"]) == 0
    args = echo_command[0]
    assert (args.data, args.model.n_layer, args.max_new_tokens) == ("d", 3, 7)
    assert args.model.n_embd == 32  # the rest of the preset is kept


def test_yaml_config_then_flags_on_top(echo_command, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: from-yaml\nsteps: 3\nmodel:\n  n_layer: 5\n")
    assert cli.main(["echo", "--config", str(config), "--steps", "4"]) == 0
    args = echo_command[0]
    assert (args.data, args.steps, args.model.n_layer, args.model.n_embd) == ("from-yaml", 4, 5, 32)


def test_print_config_round_trips_through_config(echo_command, tmp_path, capsys):
    assert cli.main(["echo", "--data", "x", "--steps", "9", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["steps"] == 9
    assert echo_command == []  # printing the config does not run the command
    config = tmp_path / "printed.yaml"
    config.write_text(printed)
    assert cli.main(["echo", "--config", str(config)]) == 0
    assert echo_command[0].steps == 9 and echo_command[0].model.n_layer == 2


def test_unknown_yaml_key_names_the_closest_valid_key(echo_command, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data: d\nmodel:\n  n_layr: 5\n")
    assert cli.main(["echo", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "unknown key 'model.n_layr'" in err and "did you mean 'model.n_layer'" in err
    assert str(config) in err


def test_bad_yaml_value_type_is_reported(echo_command, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data: d\nsteps: many\n")
    assert cli.main(["echo", "--config", str(config)]) == 1
    assert "'steps'" in capsys.readouterr().err


def test_unknown_command_suggests_the_closest(capsys):
    assert cli.main(["pretrian"]) == 1
    assert "unknown command 'pretrian'" in capsys.readouterr().err


def test_unknown_flag_names_the_closest_valid_flag():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.test_cli import run_echo; sys.exit(run_echo())",
         "--data", "d", "--model.n-layr", "3"],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert "--model.n-layer" in proc.stderr


def run_echo():
    cli.COMMANDS["echo"] = cli.Command("tests.test_cli:EchoArgs:echo", "echo")
    return cli.main(["echo", *sys.argv[1:]])


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_model_name_flag_picks_a_preset_and_derived_sizes_follow_overrides(echo_command):
    assert cli.main(["echo", "--data", "d", "--model.name", "shakespeare-char", "--model.n-embd", "128",
                     "--model.n-head", "4"]) == 0
    model = echo_command[0].model
    assert (model.name, model.n_layer, model.norm_bias) == ("shakespeare-char", 6, False)  # from the preset
    assert (model.head_dim, model.mlp_hidden, model.n_kv_head) == (32, 512, 4)  # re-derived, not 64/1536/6


def test_model_name_in_yaml_then_flags_on_top(echo_command, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: d\nmodel:\n  name: gpt2\n  n_layer: 2\n")
    assert cli.main(["echo", "--config", str(config), "--model.n-embd", "64", "--model.n-head", "2"]) == 0
    model = echo_command[0].model
    assert (model.n_layer, model.bias, model.n_embd, model.head_dim, model.mlp_hidden) == (2, "all", 64, 32, 256)
