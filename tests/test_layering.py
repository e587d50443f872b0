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
