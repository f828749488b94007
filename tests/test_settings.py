"""Settings: every CROSSLOGIC_* variable is declared in crosslogic/settings.py, parsed strictly, documented; a bad
value is one line naming the variable, for every command."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from crosslogic import settings as s
from tests.conftest import repo_root


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "on", " On "])
def test_true_spellings_mean_true(monkeypatch, raw):
    monkeypatch.setenv("CROSSLOGIC_LIMITER_SPLIT_SCOPES", raw)
    assert s.Settings().limiter_split_scopes is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "no", "off", ""])
def test_false_spellings_and_unset_mean_false(monkeypatch, raw):
    monkeypatch.setenv("CROSSLOGIC_LIMITER_SPLIT_SCOPES", raw)
    assert s.Settings().limiter_split_scopes is False


@pytest.mark.parametrize(("variable", "raw", "says"), [
    ("LIMITER_SPLIT_SCOPES", "maybe", "expected one of 1/true/yes/on/0/false/no/off"),
    ("LIMITER_SPLIT_SCOPES", "2", "expected one of"),
    ("LEDGER_BATCH_SIZE", "lots", "expected a whole number"),
    ("LEDGER_BATCH_SIZE", "0", "must be at least 1"),
    ("LEDGER_BATCH_SIZE", "2.5", "expected a whole number"),
    ("LEDGER_FLUSH_INTERVAL", "soon", "expected a number"),
    ("LEDGER_FLUSH_INTERVAL", "nan", "expected a finite number"),
    ("AUTHZ_METRICS_PORT", "70000", "must be at most 65535"),
    ("ADMISSION", "envoy", "expected one of authz, rls"),
    ("LOG_LEVEL", "loud", "expected one of DEBUG"),
])
def test_a_bad_value_names_the_variable_and_what_it_expects(monkeypatch, variable, raw, says):
    monkeypatch.setenv(f"CROSSLOGIC_{variable}", raw)
    with pytest.raises(s.SettingsError) as caught:
        s.load_all()
    message = str(caught.value)
    assert message.startswith(f"CROSSLOGIC_{variable}={raw!r} is invalid") and says in message
    assert "\n" not in message


def test_values_are_parsed_to_their_types(monkeypatch):
    monkeypatch.setenv("CROSSLOGIC_LEDGER_BATCH_SIZE", " 42 ")
    monkeypatch.setenv("CROSSLOGIC_LEDGER_FLUSH_INTERVAL", "0.5")
    monkeypatch.setenv("CROSSLOGIC_LOG_LEVEL", "debug")
    monkeypatch.setenv("CROSSLOGIC_NODE_DEAD_AFTER", "90")
    got = s.Settings()
    assert (got.ledger_batch_size, got.ledger_flush_interval_s, got.log_level) == (42, 0.5, "DEBUG")
    assert s.SchedulerSettings().dead_after_s == 90.0


@pytest.mark.parametrize("argv", [["key", "list"], ["serve", "authz", "--listen", "127.0.0.1:1"], ["up"],
                                  ["config"]])
def test_every_command_reports_a_bad_value_in_one_line_without_a_traceback(argv, tmp_path):
    result = subprocess.run([sys.executable, "-m", "crosslogic", "--state-dir", str(tmp_path), *argv],
                            env={"PATH": "/usr/bin:/bin", "CROSSLOGIC_LIMITER_SPLIT_SCOPES": "sure"},
                            capture_output=True, text=True, timeout=60, cwd=repo_root())
    assert result.returncode == 2
    assert result.stderr == ("crosslogic: error: CROSSLOGIC_LIMITER_SPLIT_SCOPES='sure' is invalid: expected one of "
                             "1/true/yes/on/0/false/no/off\n")


def _variables_read_by_the_code() -> set[str]:
    found: set[str] = set()
    for path in (repo_root() / "crosslogic").rglob("*.py"):
        if path.name == "settings.py" or "_pb2" in path.name:
            continue
        found |= set(re.findall(r"CROSSLOGIC_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    return found


def test_every_variable_the_code_names_is_a_declared_setting():
    declared = {v.name for v in s.variables()}
    names = _variables_read_by_the_code()
    assert names, "the scan found nothing: it cannot be checking anything"
    assert names <= declared, sorted(names - declared)


def test_no_code_outside_settings_reads_the_environment_for_crosslogic_variables():
    offenders = []
    for path in (repo_root() / "crosslogic").rglob("*.py"):
        text = path.read_text()
        if path.name != "settings.py" and re.search(r"(environ(\.get)?|getenv)\(\s*[\"'](CROSSLOGIC_|ENVOY_BIN)", text):
            offenders.append(str(path))
    assert not offenders


def test_every_setting_is_documented_in_docs_configuration_md():
    doc = (repo_root() / "docs" / "configuration.md").read_text()
    assert s.markdown_table() in doc, "regenerate the table: crosslogic config --markdown"
    for group in s.GROUPS:
        for f in dataclasses.fields(group):
            assert f.metadata["doc"], f.name
            assert type(f.metadata["default"]) in (str, int, float, bool), f.name


def test_readme_points_to_the_configuration_reference():
    assert "docs/configuration.md" in Path(repo_root() / "README.md").read_text()
