"""The CLI's commands, their --help, the README's documentation of them, and their usage errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_models import smol_tokenizer_dir, tiny_model_dir  # noqa: F401

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
    from longllama_lsp.model.loading import PROVENANCE_NAME

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "longllama"}))
    (plain / PROVENANCE_NAME).write_text(json.dumps({"source_kind": "gguf"}))
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


# -- errors, not guesses (issue 19) ------------------------------------------------------------------------

@pytest.fixture
def source(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def main():\n    return 1\n")
    return path


@pytest.mark.parametrize("argv, message", [
    (["ask", "q", "--repo", "{typo}"], "--repo {typo}: no such directory"),
    (["ask", "q", "--root", "{typo}"], "--repo {typo}: no such directory"),  # the hidden old spelling
    (["complete", "{source}:1:1", "--repo", "{typo}"], "--repo {typo}: no such directory"),
    (["ask", "q", "--repo", "{source}"], "--repo {source}: not a directory"),
    (["complete", "{typo}/nosuch.py:1:1"], "{typo}/nosuch.py: no such file"),
    (["complete", "m.py:1:1", "--repo", "{tmp}"],  # (the tests run in the checkout: no m.py there)
     "m.py: no such file in the current directory (FILE is relative to it, not to --repo: {source}?)"),
    (["complete", "{dir}:1:1"], "{dir}: is a directory, not a file"),
    (["complete", "{binary}:1:1"], "{binary}: not UTF-8 text (byte 0)"),
    (["ask", "  "], "the question is empty"),
])
def test_ask_and_complete_refuse_missing_paths_before_loading_creating_nothing(argv, message, tmp_path, source,
                                                                               tiny_model_dir, capsys):  # noqa: F811
    paths = dict(typo=tmp_path / "typo", source=source, dir=tmp_path, binary=tmp_path / "b.py", tmp=tmp_path)
    (tmp_path / "b.py").write_bytes(b"\xff\xfe\x00")
    before = sorted(tmp_path.rglob("*"))
    argv = [a.format(**paths) for a in argv] + ["--model", str(tiny_model_dir), "--max-tokens", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"longllama {argv[0]}: error: {message.format(**paths)}" in err and "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before  # no directory, no .longllama/


def test_complete_remembers_the_repository_that_holds_the_file(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    """`longllama complete ~/proj/x.py:1:1` run from elsewhere indexed wherever the shell stood (a home folder:
    all of it) as the file's memory. Without --repo it is the repository that holds FILE."""
    project, elsewhere = tmp_path / "proj", tmp_path / "home"
    (project / ".git").mkdir(parents=True)
    (project / "pkg").mkdir()
    (project / "pkg" / "main.py").write_text("def shout(text):\n    return text.upper()\n")
    elsewhere.mkdir()
    (elsewhere / "notes.py").write_text("SECRET_PLAN = 1\n")
    monkeypatch.chdir(elsewhere)
    assert main(["complete", f"{project / 'pkg' / 'main.py'}:2:5", "--model", str(tiny_model_dir), "--max-tokens",
                 "1", "--no-server"]) == 0
    assert (project / ".longllama").is_dir() and not (elsewhere / ".longllama").exists()


def test_ask_in_a_subfolder_remembers_the_whole_repository(tiny_model_dir, tmp_path, monkeypatch,  # noqa: F811
                                                            capsys):
    """`longllama ask` from a project's subfolder indexed that subfolder alone, in an index of its own beside the
    editor's. Every command now finds the repository as git does; a subfolder with its own index stays its own."""
    project = tmp_path / "proj"
    (project / ".git").mkdir(parents=True)
    (project / "src" / "deep").mkdir(parents=True)
    (project / "src" / "main.py").write_text("def shout(text):\n    return text.upper()\n")
    monkeypatch.chdir(project / "src" / "deep")
    argv = ["ask", "What does shout return?", "--model", str(tiny_model_dir), "--max-tokens", "1", "--no-server"]
    assert main(argv) == 0
    assert (project / ".longllama").is_dir() and not (project / "src" / ".longllama").exists()
    assert main(["status"]) == 0  # from the subfolder too: the index ask used
    assert str(project) in capsys.readouterr().out
    (project / "src" / ".longllama").mkdir()
    from longllama_lsp.cli import marked_folder

    assert marked_folder(project / "src" / "deep") == project / "src"


def test_an_empty_completion_says_so_on_stderr(capsys):
    """`longllama complete` where the model only wrote what already follows the cursor printed a blank line."""
    from longllama_lsp.commands import say_if_empty

    say_if_empty("", as_json=False)
    assert "no completion here" in capsys.readouterr().err
    say_if_empty("x = 1", as_json=False)
    say_if_empty("", as_json=True)  # the JSON holds "text": "" for scripts
    assert capsys.readouterr().err == ""


def test_repository_of_a_file(tmp_path, monkeypatch):
    from longllama_lsp.commands import repository_of

    (tmp_path / "git" / ".git").mkdir(parents=True)  # a folder, or a file in a worktree: both name a repository
    (tmp_path / "indexed" / ".longllama").mkdir(parents=True)
    for folder in ("git/a/b", "indexed/a", "plain/a", "cwd/a"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path / "cwd")
    assert repository_of(tmp_path / "git" / "a" / "b" / "m.py") == tmp_path / "git"
    assert repository_of(tmp_path / "indexed" / "a" / "m.py") == tmp_path / "indexed"
    assert repository_of(Path("a") / "m.py") == tmp_path / "cwd"  # no repository above it: the current directory
    assert repository_of(tmp_path / "plain" / "a" / "m.py") == tmp_path / "plain" / "a"  # nor in it: its folder


def test_the_search_for_a_repository_stops_below_the_home_folder(tmp_path, monkeypatch):
    """A dotfiles repository in ~ made every folder under ~ without a .git of its own all of ~."""
    from longllama_lsp.cli import marked_folder

    home = tmp_path / "home"
    (home / ".git").mkdir(parents=True)
    (home / "notes" / "a").mkdir(parents=True)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    assert marked_folder(home / "notes" / "a") is None
    assert marked_folder(home) == home  # asked from ~ itself, ~ it is


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give a folder away")
def test_another_users_index_or_folder_names_no_repository(tmp_path):
    """A `.longllama/` or `.git` another user left in a shared parent (/tmp) would have made `complete` index all
    of it."""
    from longllama_lsp.commands import repository_of

    (tmp_path / ".longllama").mkdir()
    os.chown(tmp_path / ".longllama", 1, 1)
    (tmp_path / "a").mkdir()
    assert repository_of(tmp_path / "a" / "m.py") == tmp_path / "a"
    (tmp_path / "b" / ".git").mkdir(parents=True)  # a .git in another user's folder: not a repository of yours
    (tmp_path / "b" / "c").mkdir()
    os.chown(tmp_path / "b", 1, 1)
    assert repository_of(tmp_path / "b" / "c" / "m.py") == tmp_path / "b" / "c"


def test_a_deleted_current_directory_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """`longllama status` in a directory another shell deleted ended in a FileNotFoundError traceback."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert "the current directory no longer exists" in err and "Traceback" not in err


def test_max_tokens_must_be_positive(capsys):
    with pytest.raises(SystemExit) as done:
        main(["complete", "m.py:1:1", "--max-tokens", "0"])
    assert done.value.code == 2
    assert "argument --max-tokens: expected a positive integer, got '0'" in capsys.readouterr().err
    for bad in ("-1", "x"):
        with pytest.raises(SystemExit):
            main(["ask", "why?", "--select-tokens", bad])
        assert f"argument --select-tokens: expected an integer of at least 0, got '{bad}'" in capsys.readouterr().err
    args = build_parser().parse_args(["ask", "why?", "--select-tokens", "0", "--max-tokens", "1"])
    assert (args.select_tokens, args.max_tokens) == (0, 1)


@pytest.mark.parametrize("command", [["ask", "What does shout return?"], ["complete", "main.py:1:1"]])
def test_retrieve_tokens_reaches_the_engine_of_ask_and_complete(command, tiny_model_dir, tmp_path,  # noqa: F811
                                                                monkeypatch):
    from longllama_lsp.engine import Engine

    (tmp_path / "main.py").write_text("def shout(text):\n    return text.upper()\n")
    monkeypatch.chdir(tmp_path)  # complete's FILE is relative to it
    seen = []
    load = Engine.load.__func__
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **kw: seen.append(kw["options"]) or load(cls, *a, **kw)))
    assert main([*command, "--repo", str(tmp_path), "--model", str(tiny_model_dir), "--max-tokens", "1",
                 "--retrieve-tokens", "0", "--no-server"]) == 0
    assert [o.retrieve_tokens for o in seen] == [0]


@pytest.mark.parametrize("command", [["complete", "main.py:1:1"], ["ask", "What does shout return?"]])
def test_knn_weight_reaches_the_engine(command, tiny_model_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    from longllama_lsp.engine import Engine

    (tmp_path / "main.py").write_text("def shout(text):\n    return text.upper()\n")
    monkeypatch.chdir(tmp_path)
    seen = []
    load = Engine.load.__func__
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **kw: seen.append(kw["options"]) or load(cls, *a, **kw)))
    assert main([*command, "--repo", str(tmp_path), "--model", str(tiny_model_dir), "--max-tokens",
                 "1", "--knn-weight", "0"]) == 0  # given: the model loads here, not in a running server
    assert [o.knn_weight for o in seen] == [0.0]
    for bad in ("1", "-0.1", "lots"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--knn-weight", bad])
        assert f"argument --knn-weight: expected a number from 0 to 0.9, got '{bad}'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["complete", "{source}:2:5", "--json"], ["ask", "What does main return?"]])
def test_a_closed_stdout_ends_quietly(command, source, tiny_model_dir, tmp_path):  # noqa: F811
    """`longllama complete --json | head`: the reader is gone before anything is written."""

    read, write = os.pipe()
    os.close(read)  # every write to stdout now fails with EPIPE
    argv = [a.format(source=source) for a in command]
    try:
        proc = subprocess.run([sys.executable, "-m", "longllama_lsp.cli", *argv, "--model", str(tiny_model_dir),
                               "--no-memory", "--max-tokens", "4"], stdout=write, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
                              timeout=300)
    finally:
        os.close(write)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_an_answer_cut_at_its_token_limit_says_so_and_how_to_get_more(tiny_model_dir, tmp_path):  # noqa: F811
    """A 135M model's answer often runs to the limit and ends mid-word: stderr says it was cut (stdout keeps
    the answer alone, for pipes)."""

    proc = subprocess.run([sys.executable, "-m", "longllama_lsp.cli", "ask", "What does main return?", "--model",
                           str(tiny_model_dir), "--no-memory", "--max-tokens", "3"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "[the answer stopped at its limit of 3 tokens; --max-tokens N allows a longer one]" in proc.stderr
    assert "limit" not in proc.stdout
    help_text = subprocess.run([sys.executable, "-m", "longllama_lsp.cli", "ask", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "default 48 for complete, 256 for ask" in " ".join(help_text.split())


def test_progress_bars_follow_totals_that_grow_and_print_ready_lines(capsys):
    """A pass's encode total grows tier by tier: a bar that reached one tier's total moves on with the
    next (it closes only in close()); a 'ready' tier is a line, not a bar."""
    from indexer.pipeline import Progress
    from longllama_lsp.cli import ProgressBars

    bars = ProgressBars()
    for p in [Progress("scan", 1, 2), Progress("encode", 3, 3, 30), Progress("ready", 1, 2, 30, message="open files"),
              Progress("scan", 2, 2), Progress("encode", 5, 5, 50)]:
        bars(p)
    assert all(not bar.disable for bar in bars.bars.values())  # still open: more may come
    bars.close()
    err = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", capsys.readouterr().err)  # tqdm's cursor moves between bars
    renders = [r.strip() for r in re.split(r"[\r\n]+", err)]
    assert "ready: open files (1 of 2 files) are in memory; the rest continues" in renders
    assert sorted(bars.bars) == ["encode", "scan"]
    encoding = [r for r in renders if r.startswith("encoding")]
    assert encoding and "5/5" in encoding[-1] and "50 tok" in encoding[-1]
    assert "2/2" in [r for r in renders if r.startswith("scanning")][-1]


def test_values_from_an_index_or_checkpoint_print_with_control_characters_escaped():
    """Sources and log records name files of a (maybe hostile) repository: an OSC 52 clipboard write, a
    BEL, a CR reach the terminal escaped, as repr shows them; a log record keeps its own newlines."""
    import logging

    from longllama_lsp.assembly import Source
    from longllama_lsp.cli import ShownFormatter, shown
    from longllama_lsp.commands import format_sources

    hostile, escaped = "\x1b]52;c;ZWNobyBwd25lZA==\x07\rok", "\\x1b]52;c;ZWNobyBwd25lZA==\\x07\\rok"
    assert format_sources([Source(f"a{hostile}.py", 1, 2, f"f{hostile}", 0.5)]) == \
        f"  a{escaped}.py:1-2  f{escaped}  (50.0%)"
    record = logging.LogRecord("indexer", logging.WARNING, __file__, 1, "skipping %s\nnext", (hostile,), None)
    assert ShownFormatter("%(message)s").format(record) == f"skipping {escaped}\nnext"
    assert shown("a\nb\udcff\x9b") == "a\\nb\\udcff\\x9b"  # a value's newline, undecodable byte, C1 CSI


# A completion as a hostile repository can steer the model to write it: an OSC 52 clipboard write, a
# BEL, a lone CR that would overwrite the line, a CRLF split across two streamed pieces, and a tab.
HOSTILE_PIECES = ["x = 1\t# \x1b]52;c;ZXZpbA==\x07", " ok\r", "\nevil\rgood\n"]
HOSTILE_SHOWN = "x = 1\t# \\x1b]52;c;ZXZpbA==\\x07 ok\nevil\\rgood\n"


class _SteeredWorkspace:
    """Workspace whose engine writes HOSTILE_PIECES (what is under test is what the CLI prints)."""

    def __init__(self):
        import types

        def answer(question, on_token):
            for piece in HOSTILE_PIECES:
                on_token(piece)
            return types.SimpleNamespace(sources=[], timings={}, stop_reason="eos", generated_tokens=len(HOSTILE_PIECES))

        def complete(text, offset, path, mode):
            return types.SimpleNamespace(text="".join(HOSTILE_PIECES))

        self.engine = types.SimpleNamespace(answer=answer, complete=complete)

    def close(self):
        pass


@pytest.mark.parametrize("argv", [["ask", "what?"], ["complete", "{src}:1:1"]])
def test_model_output_reaches_the_terminal_with_controls_escaped(argv, tmp_path, capsys, monkeypatch):
    from longllama_lsp import commands
    from longllama_lsp.cli import shown_text

    src = tmp_path / "a.py"
    src.write_text("x\n")
    monkeypatch.setattr(commands, "_workspace", lambda args, **options: _SteeredWorkspace())
    assert main([a.format(src=src) for a in argv] + ["--repo", str(tmp_path), "--no-server"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert out.startswith(HOSTILE_SHOWN)
    assert shown_text("a\r\nb\x9bc\td") == "a\nb\\x9bc\td"
