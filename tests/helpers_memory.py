"""An engine with a folder indexed by the real indexer, and what memory the last request could read.

Used by the tests of the open file's memory (test_open_file.py), of retrieval (test_retrieve_memory.py) and of
the kNN lookup (test_knn.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longllama_lsp.engine import Engine, EngineOptions
from longllama_lsp.model.memory import MASK_MIN
from longllama_lsp.workspace import Workspace

# A repository of small Python files: limits.py defines RETRY_LIMIT, the others unrelated names; the open
# file, upload.py, uses RETRY_LIMIT (RETRY_OPEN is its text up to the cursor).
RETRY_FILES = {
    "limits.py": "RETRY_LIMIT = 7\nBACKOFF_SECONDS = 2.5\n\n\ndef retry_budget(attempt):\n"
                 "    return RETRY_LIMIT - attempt\n",
    "colors.py": "def blend(red, green, blue):\n    return (red + green + blue) / 3\n",
    "shapes.py": "class Square:\n    def __init__(self, side):\n        self.side = side\n\n"
                 "    def area(self):\n        return self.side * self.side\n",
    "words.py": "def shout(text):\n    return text.upper() + '!'\n",
}
RETRY_OPEN = "from limits import RETRY_LIMIT\n\n\ndef upload(data):\n    for attempt in range(RETRY_LIMIT):\n        "


def write_repository(root: Path, files: dict[str, str], open_text: str) -> Path:
    """`files` written under `root`, and upload.py: `open_text` then a last line. Returns root."""
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "upload.py").write_text(open_text + "send(data)\n")
    return root


@contextlib.contextmanager
def indexed_engine(model_dir: Path, root: Path, **options: Any) -> Iterator[tuple[Engine, Any]]:
    """(engine, repository): the tiny model with 2-token completions and a 100-token window (and `options`,
    EngineOptions fields), `root` indexed (indexer.pipeline: SQLite store, tree-sitter chunks, MemoryBank)."""
    engine = Engine.load(model_dir, "cpu", decode_dtype="float32",
                         options=EngineOptions(**{"max_tokens": 2, "context_tokens": 100, **options}))
    engine.wait_ready()
    ws = Workspace(engine)
    try:
        repo = ws.open(root, user="test")
        ws.index(repo)
        yield engine, repo
    finally:
        ws.close()


def visible_chunks(engine: Engine, bank: Any) -> list[Any]:
    """Metas of the resident chunks whose every slot the last request's memory could attend to."""
    memory = engine._assembler._last[1].memory
    mask = memory[next(iter(memory))].mask[0, 0, :, 0]
    seen = []
    for cid, meta in bank.resident().items():
        slots = bank.chunk_slots(cid)
        if bool((mask[slots.start:slots.stop] > MASK_MIN / 2).all()):
            seen.append(meta)
    return seen
