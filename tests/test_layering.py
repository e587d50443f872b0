"""Import layering: the model knows nothing of editors, files or training; the indexer knows no LSP."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FORBIDDEN = {
    "longllama_lsp/model": {"pygls", "lsprotocol", "watchdog", "sqlite3", "sqlite_utils", "accelerate", "indexer",
                            "finetune"},
    "indexer": {"pygls", "lsprotocol", "accelerate", "finetune"},
    "finetune": {"pygls", "lsprotocol"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package):
    for path in (ROOT / package).rglob("*.py"):
        bad = imported_modules(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


# -- seams inside the application half (issue 14) ----------------------------------------------------------

# Leaf utilities of the indexer any layer may use: grammars (completion stop rules) and secret patterns (logs).
SHARED_LEAVES = {"indexer.languages", "indexer.secrets"}
SERVER = {"longllama_lsp.server", "longllama_lsp.service", "longllama_lsp.shared", "longllama_lsp.tcp",
          "longllama_lsp.logs", "pygls", "lsprotocol"}
CLI = ["longllama_lsp/cli.py", "longllama_lsp/commands.py", "longllama_lsp/remote.py", "indexer/commands.py", "finetune/commands.py"]
ENGINE = ["longllama_lsp/engine.py", "longllama_lsp/decode.py", "longllama_lsp/worker.py",
          "longllama_lsp/assembly.py", "longllama_lsp/prompt.py", "longllama_lsp/repository.py"]


def full_imports(path: Path) -> set[str]:
    """Every module `path` imports (relative imports resolved), at any depth of the file."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from . import x` imports module x
    return names


def _hits(imported: set[str], forbidden: set[str]) -> set[str]:
    return {m for m in imported if any(m == f or m.startswith(f + ".") for f in forbidden)}


@pytest.mark.parametrize("module", CLI)
def test_the_cli_never_imports_the_server(module):
    bad = _hits(full_imports(ROOT / module), SERVER)
    assert not bad, f"{module} imports {sorted(bad)}: reach the engine through longllama_lsp.workspace"


@pytest.mark.parametrize("module", ENGINE)
def test_the_engine_never_imports_the_indexer_or_the_workspace(module):
    imported = full_imports(ROOT / module) - _hits(full_imports(ROOT / module), SHARED_LEAVES)
    bad = _hits(imported, {"indexer", "longllama_lsp.workspace", "longllama_lsp.service", "longllama_lsp.server"})
    assert not bad, f"{module} imports {sorted(bad)}: the engine reads repository.MemorySource only"


def test_only_the_workspace_joins_the_indexer_and_the_engine():
    joiners = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "longllama_lsp").glob("*.py")
                     if _hits(full_imports(p), {"indexer"}) - _hits(full_imports(p), SHARED_LEAVES))
    assert joiners == ["longllama_lsp/workspace.py"]
