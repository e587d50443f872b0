"""A stand-in for indexer.pipeline.Indexer: one chunk per file, encoded into a real MemoryBank.

It implements longllama_lsp.repository.Repository, as the real indexer does. The server takes it
through the hidden `--indexer-factory helpers_indexer:make` option (tests/ on PYTHONPATH), so
end-to-end tests see work-done progress and sources without the real pipeline's SQLite store. It
encodes through `engine.on_worker` (the engine's worker owns the model), reports progress as
indexer.pipeline.Progress does, and sleeps a little per file, so the progress notifications are
observable.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from indexer.bank import MemoryBank
from longllama_lsp.repository import BufferChunk


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChunkMeta:
    """What MemoryBank.slot_owner returns (the ChunkRow fields that sources use)."""

    id: str
    path: str
    start_line: int
    end_line: int
    symbol: str | None = None
    ordinal: int = 0
    content_hash: str = ""
    memory_key: str = ""  # one chunk per file, encoded alone: its content hash


class FakeIndexer:
    def __init__(self, root: Path, engine: Any, delay_s: float = 0.05):
        self.root, self.engine, self.delay_s = Path(root).resolve(), engine, delay_s
        cfg = engine.model.config
        self.bank = MemoryBank(cfg.mem_layers, cfg.num_key_value_heads, cfg.head_dim, getattr(torch, cfg.mem_dtype),
                               engine.model.device)
        self.lock = threading.RLock()  # held while the bank changes (the engine copies under it)
        self.files = 0
        self.state = "idle"

    def _encode(self, ids: list[int]):
        return self.engine.model.encode_memory(torch.tensor([ids], device=self.engine.model.device))

    def index(self, progress=None, priority_paths=()) -> None:
        self.state = "indexing"
        first = {Path(p).resolve() for p in priority_paths}  # the open files first, as the real indexer does
        paths = sorted((p for p in self.root.rglob("*.py") if p.is_file() and ".longllama" not in p.parts),
                       key=lambda p: (p.resolve() not in first, p))
        window = self.engine.model.window
        for i, path in enumerate(paths, 1):
            rel = path.relative_to(self.root).as_posix()
            text = path.read_text(encoding="utf-8")
            ids = self.engine.tokenizer(text, add_special_tokens=False)["input_ids"][:window]
            if ids:
                memory = self.engine.on_worker(lambda ids=ids: self._encode(ids))
                with self.lock:
                    self.bank.add(rel, memory, ChunkMeta(rel, rel, 1, text.count("\n") + 1, path.stem,
                                                         content_hash=_hash(text), memory_key=_hash(text)))
            self.files = i
            if progress is not None:  # indexer.pipeline.Progress's fields
                progress(SimpleNamespace(phase="encode", done=i, total=len(paths), tokens=0, tokens_per_s=0.0,
                                         message=rel))
            time.sleep(self.delay_s)
        self.state = "idle"

    def chunk(self, path: str, text: str) -> list[BufferChunk]:
        """One chunk per file, as `index` cuts them."""
        return [BufferChunk(path, 0, len(text), 1, text.count("\n") + 1, Path(path).stem, text, _hash(text),
                            len(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]),
                            memory_key=_hash(text))]

    def chunk_text(self, meta: Any) -> str | None:
        """One chunk per file: the file's text."""
        path = self.root / meta.path
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def start_watching(self) -> None:
        self.state = "watching"

    def close(self) -> None:
        self.state = "idle"

    def status(self) -> dict:
        bank = self.bank.status()
        return {"root": self.root, "state": self.state, "files": self.files, "chunks": len(self.bank),
                "memory_tokens": bank.live_tokens, "bank": bank}


def make(root: Path, engine: Any, budget_tokens: int | None) -> FakeIndexer:
    return FakeIndexer(root, engine)
