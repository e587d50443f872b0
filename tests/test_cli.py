"""The CLI's commands, their --help, and the README's documentation of them agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from longllama_lsp.cli import COMMANDS, build_parser, main

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_every_command_is_in_the_readme_table():
    documented = set(re.findall(r"^\| `longllama (\w+)", README, flags=re.M))
    assert documented == set(COMMANDS), f"README table {sorted(documented)} != commands {sorted(COMMANDS)}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: longllama {name}" in out and len(out.splitlines()) > 3


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_readme_flags_exist(name):
    """Each flag the README shows for a command is accepted by that command's parser."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]
    known = {opt for action in sub._actions for opt in action.option_strings}
    row = next(line for line in README.splitlines() if line.startswith(f"| `longllama {name}"))
    for flag in re.findall(r"(--[a-z][a-z-]+)", row):
        assert flag in known, f"README mentions {flag} for `longllama {name}`, which does not accept it"


def test_top_level_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "longllama_lsp.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in COMMANDS:
        assert name in out


def test_unknown_command_fails_cleanly():
    proc = subprocess.run([sys.executable, "-m", "longllama_lsp.cli", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_ask_and_complete_warn_when_memory_layers_are_untrained(tmp_path, caplog):
    import json

    from longllama_lsp.commands import warn_if_memory_untrained

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "longllama"}))
    (plain / "longllama_convert.json").write_text(json.dumps({"source_kind": "gguf"}))
    with caplog.at_level("WARNING"):
        warn_if_memory_untrained(plain)
    assert "not FoT-trained" in caplog.text and "--no-memory" in caplog.text
    caplog.clear()
    (plain / "adapter.safetensors").write_bytes(b"")  # a FoT delta: memory trained, no warning
    with caplog.at_level("WARNING"):
        warn_if_memory_untrained(plain)
    assert caplog.text == ""


def test_version_on_both_entry_points(capsys):
    from longllama_lsp import __version__, server
    from longllama_lsp.cli import main

    for entry, prog in ((main, "longllama"), (server.main, "longllama-lsp")):
        with pytest.raises(SystemExit) as done:
            entry(["--version"])
        assert done.value.code == 0 and capsys.readouterr().out.strip() == f"{prog} {__version__}"


@pytest.mark.parametrize("argv", [
    ["index", "--repo", "R"], ["index", "R"], ["watch", "R"], ["status", "--repo", "R"], ["status", "R"],
    ["ask", "q", "--repo", "R"], ["ask", "q", "--root", "R"], ["complete", "a.py:1:1", "--root", "R"],
    ["finetune", "--repo", "R", "--out", "O"], ["eval", "--repo", "R"],
])
def test_the_repository_is_spelled_repo_everywhere_old_spellings_still_parse(argv):
    from longllama_lsp.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.repo in ("R", ["R"])
    help_text = build_parser()._subparsers._group_actions[0].choices[argv[0]].format_help()
    assert "--repo DIR" in help_text and "--root" not in help_text


def test_ci_installs_exactly_as_the_readme_says():
    """.ci/run runs the README's install and test lines verbatim (the lines after its markers)."""
    ci = (Path(__file__).parents[1] / ".ci/run").read_text().splitlines()
    block = README.split("## Set up", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    after = {marker: ci[ci.index(marker) + 1] for marker in ("# --- README: install ---", "# --- README: test ---")}
    assert after["# --- README: install ---"] == block[0]
    assert after["# --- README: test ---"] == block[1]
    assert "--index-url https://download.pytorch.org/whl/cpu" in block[0]  # the CPU build on a stock machine
