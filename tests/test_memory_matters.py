"""Memory really matters, end to end: index a repository, complete in another file, with and without memory.

Test Data: tests/fixtures/recall-tiny (a tiny LongLLaMA FoT-trained by finetune/recall_task.py to
answer `KEY =` from definitions `KEY = VALUE` held in memory; see its README). The definitions live
only in defs.py; the completion is asked for in main.py through the same path as `longllama complete`
(walker, chunker, encoder, SQLite store, bank, engine).
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import FIXTURES

from finetune.recall_task import KEYS, VALUES
from longllama_lsp.cli import main

RECALL = FIXTURES / "recall-tiny"


def complete(root: Path, query_key: str, memory: bool, capsys) -> dict:
    (root / "main.py").write_text(f"x = 1\n{query_key} =")
    col = len(f"{query_key} =") + 1  # 1-based column just after "="
    args = ["complete", f"{root / 'main.py'}:2:{col}", "--root", str(root), "--model", str(RECALL), "--json"]
    assert main(args + ([] if memory else ["--no-memory"])) == 0
    return json.loads(capsys.readouterr().out)


def test_answer_that_exists_only_in_another_file_needs_memory(tmp_path, capsys):
    pairs = [(KEYS[i], VALUES[(5 * i + 3) % len(VALUES)]) for i in range(60, 68)]
    root = tmp_path / "repo"
    root.mkdir()
    (root / "defs.py").write_text("".join(f"{k} = {v}\n" for k, v in pairs))
    right = {"memory": 0, "none": 0}
    for key, value in pairs[:4]:
        with_memory = complete(root, key, True, capsys)
        without = complete(root, key, False, capsys)
        right["memory"] += with_memory["text"].strip() == str(value)
        right["none"] += without["text"].strip() == str(value)
        assert with_memory["memory_tokens"] > 0 and without["memory_tokens"] == 0
        assert any(s["path"] == "defs.py" for s in with_memory["sources"])  # it says where the answer came from
    assert right["memory"] >= 3 and right["none"] <= 1, right
