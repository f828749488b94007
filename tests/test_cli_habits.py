"""CLI habits: global options before or after the subcommand at any depth, --version, --log-level choices,
help on every subcommand and option, one-line errors."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from crosslogic import commands as cli
from crosslogic.runtime.state import write_runtime
from tests.conftest import repo_root


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("crosslogic",)) -> Iterator[tuple]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, (*path, name))


def _leaves() -> list[tuple[str, ...]]:
    return [path[1:] for path, parser in _walk(cli.build_parser())
            if not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)]


def test_every_subcommand_and_option_has_help():
    missing = []
    for path, parser in _walk(cli.build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {choice.dest: choice.help for choice in action._choices_actions}
                missing += [f"{' '.join(path)} {name}" for name in action.choices if not helps.get(name)]
            elif not action.help:
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_every_leaf_command_accepts_the_global_options_after_it():
    parser = cli.build_parser()
    leaves = _leaves()
    assert len(leaves) > 40  # every admin, billing, limits, pki, policy command: not a handful
    for leaf in leaves:
        parser_of_leaf = dict(_walk(parser))[("crosslogic", *leaf)]
        options = parser_of_leaf._option_string_actions
        assert {"--state-dir", "--log-level", "--json"} <= set(options), leaf


@pytest.mark.parametrize("argv", [
    ["--state-dir", "S", "--log-level", "debug", "--json", "key", "list"],
    ["key", "list", "--state-dir", "S", "--log-level", "debug", "--json"],
    ["--json", "key", "--state-dir", "S", "list", "--log-level", "DEBUG"],
    ["--log-level", "debug", "limits", "show", "--json", "--state-dir", "S"],
])
def test_global_options_mean_the_same_wherever_they_are(argv):
    args = cli.build_parser().parse_args(argv)
    assert (args.state_dir, args.log_level, args.json) == ("S", "DEBUG", True)


def test_global_options_left_out_keep_their_defaults():
    args = cli.build_parser().parse_args(["key", "list"])
    assert (args.state_dir, args.log_level, args.json) == (None, None, False)


def test_an_option_after_the_subcommand_wins_over_the_same_one_before_it():
    args = cli.build_parser().parse_args(["--state-dir", "A", "org", "list", "--state-dir", "B"])
    assert args.state_dir == "B"


def _crosslogic(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crosslogic", *argv], capture_output=True, text=True,
                          timeout=60, cwd=repo_root(), env=env)


def test_key_list_finds_the_stack_through_a_state_dir_given_after_the_subcommand(gateway):
    listed = _crosslogic("key", "list", "--state-dir", gateway["state_dir"], "--json")
    assert listed.returncode == 0, listed.stderr
    assert gateway["api_key"][:16] in {k["key_prefix"] for k in json.loads(listed.stdout)}


def test_a_state_dir_without_a_stack_is_a_one_line_error(tmp_path):
    write_runtime(tmp_path, {})
    result = _crosslogic("org", "list", "--state-dir", str(tmp_path), env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no database" in result.stderr


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    result = _crosslogic("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"crosslogic {version('crosslogic')}"


def test_log_level_is_one_of_the_levels():
    result = _crosslogic("--log-level", "loud", "config")
    assert result.returncode == 2 and "invalid choice: 'LOUD'" in result.stderr
    assert _crosslogic("config", "--log-level", "warning").returncode == 0


def test_migrate_and_config_answer_in_json():
    rows = json.loads(_crosslogic("config", "--json").stdout)
    assert {r["variable"] for r in rows} >= {"CROSSLOGIC_DATABASE_URL", "CROSSLOGIC_LOG_LEVEL"}
    shown = _crosslogic("config", "--json", env={"PATH": "/usr/bin:/bin", "CROSSLOGIC_KEY_SECRET": "hush"}).stdout
    assert "hush" not in shown and "(set)" in shown


def test_server_command_table_matches_what_the_modules_register():
    for module_name, commands in cli.SERVER_COMMANDS.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(module_name).register(sub)
        helps = {choice.dest: choice.help for choice in sub._choices_actions}
        assert set(sub.choices) == set(commands), module_name
        assert helps == commands, module_name


def test_without_the_server_dependencies_commands_say_what_to_install(monkeypatch, capsys):
    """As in an agent-only install: the server modules cannot be imported."""
    real_import = importlib.import_module

    def no_server(name, *args):
        if name in cli.SERVER_COMMANDS:
            raise ModuleNotFoundError("No module named 'asyncpg'", name="asyncpg")
        return real_import(name, *args)

    monkeypatch.setattr(cli.importlib, "import_module", no_server)
    parser = cli.build_parser()
    args = parser.parse_args(["org", "list", "--json"])
    assert args.handler(args) == 2
    assert capsys.readouterr().err == f"crosslogic: error: `org` needs the control-plane dependencies: " \
                                      f"{cli.SERVER_HINT}\n"
