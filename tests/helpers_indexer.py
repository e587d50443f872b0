"""A stand-in for indexer.pipeline.Indexer: one chunk per file, encoded into a real MemoryBank.

The server takes it through the hidden `--indexer-factory tests.helpers_indexer:make` option, so
the end-to-end tests see work-done progress and sources without the real pipeline. It encodes
through `engine.call` (the engine worker owns the model) and sleeps a little per file, so the
progress notifications are observable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from indexer.bank import MemoryBank


@dataclass(frozen=True)
class ChunkMeta:
    id: str
    path: str
    start_line: int
    end_line: int
    symbol: str | None = None
    ordinal: int = 0


class FakeIndexer:
    def __init__(self, root: Path, engine: Any, delay_s: float = 0.05):
        self.root, self.engine, self.delay_s = Path(root), engine, delay_s
        cfg = engine.model.config
        self.bank = MemoryBank(cfg.mem_layers, cfg.num_key_value_heads, cfg.head_dim, getattr(torch, cfg.mem_dtype),
                               engine.model.device)
        self.files = 0
        self.watching = False

    def _encode(self, ids: list[int]):
        return self.engine.model.encode_memory(torch.tensor([ids], device=self.engine.model.device))

    def index(self, progress=None) -> None:
        paths = sorted(p for p in self.root.rglob("*.py") if p.is_file())
        window = self.engine.model.window
        for i, path in enumerate(paths, 1):
            rel = path.relative_to(self.root).as_posix()
            text = path.read_text(encoding="utf-8")
            ids = self.engine.tokenizer(text, add_special_tokens=False)["input_ids"][:window]
            if ids:
                memory = self.engine.call(self._encode, ids)
                self.bank.add(rel, memory, ChunkMeta(rel, rel, 1, text.count("\n") + 1, path.stem))
            self.files = i
            if progress is not None:
                progress(i, len(paths), rel)
            time.sleep(self.delay_s)

    def start_watching(self) -> None:
        self.watching = True

    def stop(self) -> None:
        self.watching = False

    def status(self) -> dict:
        return {"root": str(self.root), "files": self.files, "chunks": len(self.bank),
                "memoryTokens": self.bank.status().live_tokens, "watching": self.watching}


def make(root: Path, engine: Any, settings: Any) -> FakeIndexer:
    return FakeIndexer(root, engine)
