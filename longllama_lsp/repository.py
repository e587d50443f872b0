"""The typed seam between a repository's indexer and the rest: what the engine reads, what the
workspace drives. indexer.pipeline.Indexer and the test fake (tests/helpers_indexer.py) implement it.

    indexer (Repository) -> workspace (one per root) -> engine (reads MemorySource) -> server / CLI

Plain Protocols, no imports of the indexer: the engine and the server depend on this module only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .model.memory import Memory


@dataclass(frozen=True)
class BufferChunk:
    """A chunk of an open buffer, cut as the repository's indexer cuts files: a chunk whose
    `memory_key` equals an indexed chunk's has that chunk's memory (same text after the same context;
    the same `content_hash` alone: same text). Offsets are code points into the buffer; lines 1-based,
    inclusive. `id` is its key in the bank once its memory is there."""

    path: str  # relative to the repository root, as the bank names files
    start: int
    end: int
    start_line: int
    end_line: int
    symbol: str | None
    text: str
    content_hash: str  # of the text
    token_count: int
    memory_key: str  # what its memory is encoded from: the text after `context` (indexer.encoder.memory_key)
    context: str = ""  # the end of the text before it, which its memory is encoded after
    id: Hashable | None = None


class Bank(Protocol):
    """A repository's memory on the device (indexer.bank.MemoryBank)."""

    version: int  # bumped on every change: what is built from memory() may be cached until then

    def __len__(self) -> int: ...

    def __contains__(self, chunk_id: Hashable) -> bool: ...

    def memory(self, exclude_paths: Iterable[str] = (), exclude_chunks: Iterable[Hashable] = ()) -> Memory: ...

    def add(self, chunk_id: Hashable, memory: Memory, meta: Any) -> bool: ...  # the engine adds edited buffer chunks

    def remove(self, chunk_id: Hashable) -> bool: ...

    def chunks_of(self, path: str) -> dict[Hashable, Any]: ...  # resident chunk id -> meta (with content_hash)

    def resident(self) -> dict[Hashable, Any]: ...  # every resident chunk id -> meta (path, content_hash)

    def slot_owner(self, slot: int) -> Any | None: ...  # the chunk row (path, start_line, ...) of a slot

    def chunk_slots(self, chunk_id: Hashable) -> range | None: ...

    def touch(self, path: str) -> None: ...


class MemorySource(Protocol):
    """What the engine reads: a bank, the root its paths are relative to, the lock that guards it, and
    the indexer's chunking of an open buffer (same cuts and content hashes as an indexed file)."""

    root: Path
    lock: AbstractContextManager  # held by the indexer while it changes the bank, by the engine while it reads

    @property
    def bank(self) -> Bank: ...  # never None: an indexer that keeps no memory (one-shot index) is no MemorySource

    def chunk(self, path: str, text: str) -> Sequence[BufferChunk]: ...  # path relative to root

    # The text of an indexed chunk (a resident chunk's meta), read back from its file; None when it cannot be
    # read or the file changed since it was chunked (the watcher re-indexes it).
    def chunk_text(self, meta: Any) -> str | None: ...


class Progress(Protocol):
    """One progress report: `phase` is 'scan' (files), 'encode' (chunks), or 'ready' (a priority tier's
    memory is in the bank: `message` names the tier, done/total count files ready of all)."""

    phase: str
    done: int
    total: int
    tokens: int  # encoded so far
    tokens_per_s: float
    message: str


ProgressFn = Callable[[Progress], None]


@runtime_checkable
class Repository(MemorySource, Protocol):
    """One indexed root, as the workspace drives it."""

    # A full pass, returns a summary; priority_paths (the files open in an editor) and their neighbourhood
    # are in memory first, the 'ready' Progress says when.
    def index(self, progress: ProgressFn | None = None, priority_paths: Iterable[str | os.PathLike] = ()
              ) -> Any: ...

    def start_watching(self) -> Any: ...

    def close(self) -> None: ...

    def status(self) -> dict[str, Any]: ...
