"""The one place the indexer's stages meet: walk -> chunk -> diff by content hash -> encode -> store -> bank.

    with Indexer.open(root, model, tokenizer, model_dir) as ix:
        ix.index(progress=print)          # a full pass: only new content reaches the model
        ix.update(["src/app.py"])         # after a save: only that file's changed chunks
        memory = ix.bank.memory()

Resumable by construction: a file's chunk rows commit (one transaction) before their memories are
encoded, and memories commit in batches, so after a kill the next pass finds the chunks whose
memory is missing and encodes just those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from indexer.bank import MemoryBank
from indexer.chunker import chunk_file, decode_bytes
from indexer.encoder import Encoder, contexts, keyed, memory_key
from indexer.priority import Tiers, recently_changed, tiers
from indexer.schema import CONTEXT_CHARS, ChunkRow, FileRow, Fingerprint
from indexer.secrets import DETECTOR_VERSION
from indexer.store import Store, index_path
from indexer.walker import Decision, WalkRules, content_reason, explain, printable_path, walk_with_skips
from longllama_lsp.model.memory import Memory
from longllama_lsp.repository import BufferChunk
from longllama_lsp.safefile import UnsafeFile, open_regular, read_regular

logger = logging.getLogger(__name__)

OWN_DIR = ".longllama/"  # our own database: not worth a 'skipped' line in status
CONTENT_RULES = "content_rules"  # meta key: the content rules the stored files were last checked under
ENCODE_BATCH_CHUNKS = 64  # chunks per encode + commit round: the most work a kill -9 can lose


@dataclass
class Progress:
    """What a progress bar shows; `phase` is 'scan' (walk + chunk), 'encode', or 'ready' (a priority
    tier's memory is in the bank: `message` names it, `done`/`total` count files ready of all)."""

    phase: str
    done: int
    total: int
    tokens: int = 0
    tokens_per_s: float = 0.0
    message: str = ""
    tokens_total: int = 0  # encode: tokens this pass must encode as known so far (grows per tier)

    @property
    def eta_s(self) -> float | None:
        """Seconds left for the known encoding work at the current rate."""
        if self.phase != "encode" or self.tokens_per_s <= 0 or self.tokens_total < self.tokens:
            return None
        return (self.tokens_total - self.tokens) / self.tokens_per_s


@dataclass
class IndexSummary:
    files_indexed: int = 0
    files_changed: int = 0
    files_deleted: int = 0
    files_skipped: int = 0
    chunks: int = 0
    chunks_encoded: int = 0
    tokens_encoded: int = 0
    seconds: float = 0.0
    ready_seconds: float | None = None  # when the open files and their imports were in memory
    ready_files: int = 0  # how many files that was
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append((path, reason))
        self.files_skipped += 1

    def line(self) -> str:
        rate = self.tokens_encoded / self.seconds if self.seconds else 0.0
        return (f"{self.files_indexed} files ({self.files_changed} changed, {self.files_deleted} deleted, "
                f"{self.files_skipped} skipped), {self.chunks} chunks; encoded {self.chunks_encoded} chunks / "
                f"{self.tokens_encoded} tokens in {self.seconds:.1f} s ({rate:.0f} tokens/s)")


ProgressFn = Callable[[Progress], None]


def fingerprint_for(model, model_dir: Path, context_chars: int = CONTEXT_CHARS) -> Fingerprint:
    from longllama_lsp.model.loading import fingerprint_details

    cfg = model.config
    return Fingerprint.from_details(fingerprint_details(model_dir), cfg.num_key_value_heads, cfg.head_dim,
                                    context_chars)


def checkpoint_fingerprint(model_dir: Path, context_chars: int = CONTEXT_CHARS) -> Fingerprint:
    """The index fingerprint from the checkpoint's files alone (config, and file hashes the loader's
    sidecar caches by size and mtime): equal to `fingerprint_for(loaded model, model_dir)`."""
    from longllama_lsp.model.loading import fingerprint_details

    kv_heads, head_dim = _kv_shape(model_dir)
    return Fingerprint.from_details(fingerprint_details(model_dir), kv_heads, head_dim, context_chars)


def _kv_shape(model_dir: Path) -> tuple[int, int]:
    """(KV heads, head dim) from config.json as LlamaConfig defaults them; the config class itself
    imports transformers (seconds of a no-op index), so it is built only for a config that lacks them."""
    from longllama_lsp.model.loading import load_config, read_config_dict

    raw = read_config_dict(model_dir)
    try:
        heads = int(raw["num_attention_heads"])
        return int(raw.get("num_key_value_heads") or heads), int(raw.get("head_dim") or raw["hidden_size"] // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        cfg = load_config(model_dir)  # its clear CheckpointError for a broken config
        return cfg.num_key_value_heads, cfg.head_dim


def checkpoint_meta(model_dir: Path) -> dict[str, str | None]:
    """What `longllama status` says about the model that built an index."""
    from longllama_lsp.model.loading import memory_training, read_provenance

    model_dir = Path(model_dir)
    return {"name": model_dir.name, "path": str(model_dir), "source": (read_provenance(model_dir) or {}).get("source"),
            "memory_training": memory_training(model_dir)}


READY_TIERS = ("open files", "their imports")  # after these, the open file's neighbourhood is in memory


class _Run:
    """One pass's counters, turned into Progress events (scan and encode totals span the tiers)."""

    def __init__(self, t0: float, files: int, progress: ProgressFn | None):
        self.t0, self.files, self.progress = t0, files, progress
        self.files_done = self.chunks_done = self.chunks_total = self.tokens_total = 0
        self.encode_s = 0.0  # model time only: the rate that predicts the rest

    def scanned(self, path: str) -> None:
        self.files_done += 1
        if self.progress is not None:
            self.progress(Progress("scan", self.files_done, self.files, message=path))

    def encoded(self, summary: IndexSummary, chunks: int, seconds: float) -> None:
        """A batch of `chunks` is stored; its encoding took `seconds`."""
        self.chunks_done += chunks
        self.encode_s += seconds
        self._report(self.chunks_done, summary.tokens_encoded, self.encode_s)

    def encoding(self, summary: IndexSummary) -> Callable[[int, int], None]:
        """Per-chunk reports from inside a batch (the encoder's callback), so a log line every few
        seconds is possible even when a batch takes minutes."""
        chunks = tokens = 0
        start = time.perf_counter()

        def step(n_chunks: int, n_tokens: int) -> None:
            nonlocal chunks, tokens
            chunks, tokens = chunks + n_chunks, tokens + n_tokens
            self._report(self.chunks_done + chunks, summary.tokens_encoded + tokens,
                         self.encode_s + time.perf_counter() - start)

        return step

    def _report(self, chunks: int, tokens: int, seconds: float) -> None:
        if self.progress is not None:
            rate = tokens / seconds if seconds else 0.0
            self.progress(Progress("encode", chunks, self.chunks_total, tokens, rate, tokens_total=self.tokens_total))

    def ready(self, tier: str, summary: IndexSummary) -> None:
        summary.ready_seconds = time.perf_counter() - self.t0
        summary.ready_files = self.files_done
        if self.progress is not None:
            self.progress(Progress("ready", self.files_done, self.files, summary.tokens_encoded, message=tier))


@contextlib.contextmanager
def _closed_on_error(store: Store) -> Iterator[None]:
    """An Indexer being built: a failure before it owns `store` (a full disk under the first write)
    closes the store, releasing its writer lock, which this process would otherwise hold until it exits."""
    try:
        yield
    except BaseException:
        store.close()
        raise


class _Follower:
    """A read-only index's watcher: polls SQLite's data_version (a counter of other connections'
    commits) and lets the indexer bank what its writer committed. Not filesystem events: they come
    before the writer has re-encoded the file. Once the writer has stopped, the indexer takes the
    index over and watches files itself (`Indexer.take_over`); this thread then ends."""

    def __init__(self, indexer: Indexer, debounce: float, on_update: Callable[[IndexSummary], None] | None,
                 interval: float = 1.0):
        self.indexer, self.interval = indexer, interval
        self.debounce, self.on_update = debounce, on_update  # for the file watcher after a take-over
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="longllama-follow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        seen = None
        while not self._stop.wait(self.interval):
            try:
                if self.indexer.take_over(self):
                    return
                version = self.indexer.store.data_version()
                if version != seen:
                    seen = version
                    if changed := self.indexer.follow_writer():
                        logger.info("%s: %d files from the index's writer", self.indexer.root, changed)
            except Exception:  # noqa: BLE001 - a damaged read must not end following; the next commit retries
                logger.exception("following the index of %s failed", self.indexer.root)


class Indexer:
    """Keeps one repository's memory current: SQLite cache on disk, MemoryBank on the device.

    `lock` guards the bank: the indexer holds it only while changing the bank; the engine holds it
    while a request uses `bank.memory()` views. Opened with no bank (`open_checkpoint(device=None)`, the
    one-shot `longllama index`): nothing is kept on a device, the database is the product, and the
    indexer is no repository.MemorySource (`bank` raises).
    """

    def __init__(self, root: Path, store: Store, bank: MemoryBank | None, encoder: Encoder,
                 rules: WalkRules = WalkRules(), chunk_tokens: int = 256):  # noqa: B008 (frozen)
        self.root, self.store, self._bank, self.encoder = Path(root).resolve(), store, bank, encoder
        self.rules, self._chunk_tokens = rules, chunk_tokens
        self.lock = threading.RLock()
        self.loaded = False  # bank filled from the store
        self.state = "read-only" if store.readonly else "idle"  # idle | indexing | watching | read-only
        self._watcher = None
        self._texts: dict[str, str] = {}  # content hash -> chunk text, for chunks not yet encoded
        self._contexts: dict[str, str] = {}  # memory key -> the context it is encoded after, likewise
        self._trust_mtime = False  # a file's stored size/mtime spares reading it (same content rules)
        self._followed: dict[str, tuple[str | None, int]] = {}  # read-only: the writer's files as banked

    @property
    def bank(self) -> MemoryBank:
        """The repository's memory on the device, which the engine reads (repository.MemorySource)."""
        if self._bank is None:
            raise RuntimeError("this indexer keeps no memory on a device (opened with device=None): "
                               "it is no MemorySource")
        return self._bank

    @property
    def context_chars(self) -> int:
        """How much text before a chunk its memory is encoded after: the store's fingerprint says."""
        return self.store.fingerprint.context_chars

    @functools.cached_property
    def chunk_tokens(self) -> int:
        """The chunk budget. A chunk longer than the model's window would be cut short by the encoder: its
        memory would miss the tail while its row claims the whole text. (Read on the first file to chunk:
        a lazy encoder learns the window from the config, which a no-op pass never needs.)"""
        return min(self._chunk_tokens, self.encoder.max_chunk_tokens)

    @classmethod
    def open(cls, root: Path, model, tokenizer, model_dir: Path, *, db_path: Path | None = None,
             device=None, budget_tokens: int | None = None, rules: WalkRules = WalkRules(),  # noqa: B008
             chunk_tokens: int = 256, batch_tokens: int = 4096,
             run_model: Callable[[Callable[[], Memory]], Memory] | None = None, rebuild: bool = False,
             readonly: bool = False, context_chars: int = CONTEXT_CHARS) -> Indexer:
        """run_model: runs each encode on the model's owner thread (the engine's worker); None: here.
        readonly: read the index as another process writes it (no writer lock): `index` only loads what
        is stored into the bank; the engine still encodes an open buffer's edits, in memory.
        context_chars: how much of the text before a chunk its memory is encoded after (indexer.encoder)."""
        fp = fingerprint_for(model, Path(model_dir), context_chars)
        store = Store.open(db_path or index_path(root, fp), fp, rebuild=rebuild, readonly=readonly)
        with _closed_on_error(store):
            if not readonly:  # a server's index names its model in `longllama status` as `longllama index`'s does
                store.set_meta("checkpoint", json.dumps(checkpoint_meta(model_dir)))
            device = device or next(model.parameters()).device
            # Blocks of the model's sparse memory attention: the bank's summaries are then the model's.
            bank = MemoryBank.for_store(store, device, budget_tokens=budget_tokens,
                                        block_size=model.config.mem_block_size)
            encoder = Encoder(model, tokenizer, batch_tokens=batch_tokens, run_model=run_model)
            return cls(root, store, bank, encoder, rules, chunk_tokens)

    @classmethod
    def open_checkpoint(cls, root: Path, model_dir: Path, encoder, *, device: str | None = "cpu",
                        db_path: Path | None = None, budget_tokens: int | None = None,
                        rules: WalkRules = WalkRules(),  # noqa: B008
                        chunk_tokens: int = 256, rebuild: bool = False,
                        context_chars: int = CONTEXT_CHARS) -> Indexer:
        """Like `open`, without a loaded model: `encoder` (an indexer.encoder.LazyEncoder) loads it
        when a chunk needs encoding, so a pass with nothing new never does. device: the bank's; None:
        no bank (the one-shot `longllama index`, whose product is the database)."""
        fp = checkpoint_fingerprint(Path(model_dir), context_chars)
        store = Store.open(db_path or index_path(root, fp), fp, rebuild=rebuild)
        with _closed_on_error(store):
            store.set_meta("checkpoint", json.dumps(checkpoint_meta(model_dir)))
            # The default block size (no transformers import here: `longllama index` with nothing new must
            # stay fast); the engine's banks take the loaded model's (`open`).
            bank = None if device is None else MemoryBank.for_store(store, device, budget_tokens=budget_tokens)
            return cls(root, store, bank, encoder, rules, chunk_tokens)

    def __enter__(self) -> Indexer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.stop_watching()
        self.store.close()

    # -- full pass ------------------------------------------------------------------------------

    def index(self, progress: ProgressFn | None = None, priority_paths: Iterable[str | os.PathLike] = ()
              ) -> IndexSummary:
        """Bring store and bank up to date with the whole tree, most useful files first.

        priority_paths: the files open in an editor. They, what they import, and recently changed
        files (git) are chunked, encoded and put in the bank before the rest is even read, so their
        memory is usable (and a 'ready' Progress says so) long before the pass ends.
        """
        t0, summary = time.perf_counter(), IndexSummary()
        if self.store.readonly:
            return self._load_stored(summary, t0)
        self.state = "indexing"
        try:
            self._trust_mtime = self.store.meta().get(CONTENT_RULES) == self._content_rules()
            decisions = list(walk_with_skips(self.root, self.rules, read=False))
            wanted = {d.file.path: d for d in decisions if d.file is not None}
            summary.skipped = [(d.path, d.reason) for d in decisions
                               if d.file is None and not d.path.startswith(OWN_DIR)]
            summary.files_skipped = len(summary.skipped)
            summary.files_deleted = self._delete_missing(set(wanted) | {p for p, _ in summary.skipped})
            summary.files_deleted += self._record_skips(summary.skipped)
            run = _Run(t0, len(wanted), progress)
            for name, paths in self._tiers(wanted, priority_paths).named():
                if not paths:
                    continue  # nothing to scan, encode or bank (and no store query to ask)
                self._index_tier([wanted[p] for p in paths], summary, run)
                if name in READY_TIERS:
                    run.ready(name, summary)
            self.store.gc()
            self.store.compact()
            self.store.set_meta(CONTENT_RULES, self._content_rules())  # every file was checked under them
        finally:
            self.state = "watching" if self._watcher else "idle"
        summary.files_indexed, summary.chunks = self.store.totals()
        summary.seconds = time.perf_counter() - t0
        return summary

    def _load_bank_once(self) -> None:
        """Everything stored goes into the bank on the first pass (later passes refresh what changed)."""
        if self._bank is not None and not self.loaded:
            with self.lock:
                if self.store.readonly:  # before the load: a commit in between is refreshed, not missed
                    self._followed = self.store.file_signatures()
                self._bank.load_from_store(self.store)
            self.loaded = True

    def follow_writer(self) -> int:
        """A read-only index: move what its writer committed since the last look into the bank (files
        re-indexed, their memories stored, files dropped); returns how many files changed."""
        now = self.store.file_signatures()
        changed = [path for path, signature in now.items() if self._followed.get(path) != signature]
        gone = [path for path in self._followed if path not in now]
        self._unbank(gone)
        self._refresh_bank(changed)
        self._followed = now
        return len(changed) + len(gone)

    def _load_stored(self, summary: IndexSummary, t0: float) -> IndexSummary:
        """A read-only index's pass: what another process stored goes into the bank; nothing is walked."""
        self._load_bank_once()
        stats = self.store.stats()
        summary.files_indexed, summary.chunks = stats.files, stats.chunks
        summary.seconds = time.perf_counter() - t0
        return summary

    def _tiers(self, wanted: dict[str, Decision], priority_paths: Iterable[str | os.PathLike]) -> Tiers:
        first = [r for r in (self._relative(p) for p in priority_paths) if r is not None]
        if not first:
            return Tiers(rest=list(wanted))  # no editor: walk order (git is not worth asking)

        def read(rel: str) -> bytes | None:
            try:
                return read_regular(wanted[rel].file.abs_path, self.rules.max_bytes + 1)[0]
            except (OSError, UnsafeFile, KeyError):
                return None

        return tiers({p: d.file for p, d in wanted.items()}, first, read, recently_changed(self.root))

    def _index_tier(self, files: list[Decision], summary: IndexSummary, run: _Run) -> None:
        """Chunk, encode and bank one tier's files."""
        changed = self._scan(files, summary, run)
        self._load_bank_once()  # what earlier runs stored is usable at once, before any encoding
        self._encode_missing(summary, run.progress, paths={d.file.path for d in files}, run=run)
        self._refresh_bank(changed)

    def _delete_missing(self, wanted: set[str]) -> int:
        gone = [f.path for f in self.store.files() if f.path not in wanted]
        for path in gone:
            self._forget(path)
        return len(gone)

    def _record_skips(self, skipped: list[tuple[str, str]]) -> int:
        """Keep the walk's skip reasons as 'skipped' rows, for `longllama status`; returns how many of
        those paths were indexed before (now ignored, say) and so left the index."""
        dropped = 0
        for path, reason in skipped:
            old = self.store.file(path)
            if old is not None and old.status == "skipped" and old.skip_reason == reason:
                continue
            if old is not None and old.status == "indexed":
                self._unbank([path])
                dropped += 1
            try:
                st = (self.root / path).lstat()
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = 0, 0
            self.store.replace_file(FileRow(path, None, size, mtime, status="skipped", skip_reason=reason))
        return dropped

    def _forget(self, path: str) -> None:
        self.store.delete_file(path)
        self._unbank([path])

    def _scan(self, files: list[Decision], summary: IndexSummary, run: _Run) -> list[str]:
        """Chunk every new or changed file into the store; returns the paths whose chunks changed."""
        changed = []
        for decision in files:
            if self._scan_file(decision.file.path, decision.file.abs_path, summary):
                changed.append(decision.file.path)
            run.scanned(decision.file.path)
        summary.files_changed += len(changed)
        return changed

    def _scan_file(self, rel: str, path: Path, summary: IndexSummary) -> bool:
        """Re-chunk `rel` if its bytes changed. True when its chunk rows changed.

        The one read of a file per pass: the walk judged it by name and lstat only, so the content rules
        (binary, generated, minified, secret) run here, on the very bytes that get chunked, and only for
        a file whose size or mtime changed. Opened without following a symlink: a file swapped for a
        link (to ~/.ssh/id_rsa, to /dev/zero) since the walk is skipped, never read."""
        old = self.store.file(rel)
        try:
            with os.fdopen(open_regular(path), "rb") as f:
                st = os.fstat(f.fileno())
                if self._trust_mtime and old is not None and old.content_hash is not None \
                        and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
                    if old.status == "skipped":  # still, for the same reason
                        summary.skip(rel, old.skip_reason or "skipped")
                    return False  # unchanged by size and mtime: not even read (a walk skip has no hash)
                data = f.read(self.rules.max_bytes + 1)
        except FileNotFoundError as exc:  # vanished since the walk: the next pass forgets it
            logger.info("skipping %s: %s", rel, exc)
            return False
        except UnsafeFile as exc:
            return self._skip(rel, old, None, f"changed during the walk: {exc.reason}", summary)
        except OSError as exc:  # unreadable: recorded, the pass goes on
            return self._skip(rel, old, None, f"unreadable: {exc.strerror or exc}", summary)
        digest = hashlib.sha256(data).hexdigest()
        reason = content_reason(rel, data, self.rules)
        if reason is not None:
            return self._skip(rel, old, FileRow(rel, digest, st.st_size, st.st_mtime_ns), reason, summary)
        if old is not None and old.content_hash == digest and old.status == "indexed":
            self.store.replace_file(FileRow(rel, digest, st.st_size, st.st_mtime_ns, old.language, old.decode),
                                    self.store.chunks(rel))
            return True  # same content, new chunk ids: the bank reloads them (no model time)
        chunked = chunk_file(rel, data, self.encoder.count_tokens, self.chunk_tokens)
        status = "skipped" if chunked.skip_reason else "indexed"
        row = FileRow(rel, digest, st.st_size, st.st_mtime_ns, chunked.language, chunked.decode_policy,
                      status, chunked.skip_reason)
        chunks = keyed(chunked.chunks, self.context_chars)
        self.store.replace_file(row, [c for c, _ in chunks])
        if chunked.skip_reason:
            summary.skip(rel, chunked.skip_reason)
        for c, context in chunks:
            self._texts[c.content_hash] = c.text
            self._contexts[c.memory_key] = context
        return True

    def _skip(self, rel: str, old: FileRow | None, row: FileRow | None, reason: str, summary: IndexSummary) -> bool:
        """Record `rel` as skipped for `reason` (row: its hash, size and mtime when they were read);
        True when it had chunks, which must leave the bank."""
        logger.info("skipping %s: %s", rel, reason)
        summary.skip(rel, reason)
        row = row or FileRow(rel, None, 0, 0)
        self.store.replace_file(dataclasses.replace(row, status="skipped", skip_reason=reason))
        return old is not None and old.status == "indexed"

    def _content_rules(self) -> str:
        """What content_reason depends on: its settings and the secret detector's version (an upgrade may
        flag what the last one let through). A stored size/mtime shortcut holds only under the same."""
        return json.dumps([self.rules.max_bytes, self.rules.include_secrets, self.rules.minified_line_chars,
                           DETECTOR_VERSION])

    # -- encoding -------------------------------------------------------------------------------

    def _encode_missing(self, summary: IndexSummary, progress: ProgressFn | None, paths: set[str] | None = None,
                        run: _Run | None = None, select: Callable[[ChunkRow], bool] | None = None) -> None:
        """Encode the chunks (of `paths`, or all; those `select` accepts) whose memory key has no memory yet."""
        rows = [r for r in self.store.chunks_missing_memory(paths) if select is None or select(r)]
        todo = {r.memory_key: r for r in rows}  # the same text after the same context is encoded once
        keys = list(todo)
        run = run or _Run(time.perf_counter(), 0, progress)
        run.tokens_total += sum(todo[k].token_count for k in keys)
        run.chunks_total += len(keys)
        for start in range(0, len(keys), ENCODE_BATCH_CHUNKS):
            batch = keys[start:start + ENCODE_BATCH_CHUNKS]
            inputs = {k: (self._context_of(todo[k]), self._text_of(todo[k])) for k in batch}
            inputs = {k: (context, text) for k, (context, text) in inputs.items()
                      if context is not None and text is not None}  # else the file changed: the next scan
            t0 = time.perf_counter()
            encoded = self.encoder.encode([text for _, text in inputs.values()], run.encoding(summary),
                                          [context for context, _ in inputs.values()])
            memories = dict(zip(inputs, encoded, strict=True))
            seconds = time.perf_counter() - t0
            self.store.put_memories(memories)
            summary.tokens_encoded += sum(m.num_tokens for m in memories.values())
            summary.chunks_encoded += len(memories)
            for k in batch:
                self._texts.pop(todo[k].content_hash, None)
                self._contexts.pop(k, None)
            run.encoded(summary, len(batch), seconds)

    def _context_of(self, row: ChunkRow) -> str | None:
        """The text `row`'s memory is encoded after: from this run's chunking, else from the file's earlier
        chunks read back (a run that was killed); None when they no longer give `row`'s memory key."""
        if row.memory_key == row.content_hash:
            return ""  # encoded alone (the first chunk of a file, or an index without contexts)
        context = self._contexts.get(row.memory_key)
        if context is not None:
            return context
        before, chars = [], 0
        for earlier in reversed([r for r in self.store.chunks(row.path) if r.ordinal < row.ordinal]):
            if chars > self.context_chars:
                break
            text = self._text_of(earlier)
            if text is None:
                return None
            before.insert(0, text)
            chars += len(text)
        context = contexts([*before, ""], self.context_chars)[-1]
        return context if memory_key(row.content_hash, context) == row.memory_key else None

    def chunk_text(self, meta: ChunkRow) -> str | None:
        """A resident chunk's text (repository.MemorySource), from any thread: read back from its file as
        UTF-8 without the store (one connection, the indexer's thread), None unless it hashes as indexed
        (a file decoded as Latin-1 never does: its chunks are not retrieved)."""
        text = self._texts.get(meta.content_hash)
        return text if text is not None else self._read_chunk(meta, "utf-8+replace")

    def _text_of(self, row: ChunkRow) -> str | None:
        """The chunk's text: from this run's chunking, else re-read (a run that was killed)."""
        text = self._texts.get(row.content_hash)
        if text is not None:
            return text
        file = self.store.file(row.path)
        return self._read_chunk(row, file.decode if file else "utf-8")

    def _read_chunk(self, row: ChunkRow, decode: str) -> str | None:
        try:
            data, _ = read_regular(self.root / row.path, self.rules.max_bytes + 1)
        except (OSError, UnsafeFile):
            return None
        text = decode_bytes(data[row.start_byte:row.end_byte], decode)
        if hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest() != row.content_hash:
            return None  # the file changed since it was chunked; the next scan re-chunks it
        return text

    def _refresh_bank(self, paths: Iterable[str]) -> None:
        """Replace the bank's chunks of `paths` with their stored memories. A chunk whose text is unchanged
        but whose memory is not stored yet (an edit above it changed the text before it: encoded later in
        this pass, or by the writer this index follows) keeps the memory its text has in the bank now: a
        little stale for a moment, rather than missing from memory."""
        paths = list(paths)
        if self._bank is None or not paths:
            return
        with self.lock:
            banked = self._banked(paths)
            self._unbank(paths)
            self._bank.load_from_store(self.store, paths=paths, stand_ins=banked)

    def _banked(self, paths: Iterable[str]) -> dict[str, str]:
        """The texts of `paths` whose memory the bank holds: content hash -> the memory key of that memory
        (a stand-in's own row names the key it waits for, not the memory it holds)."""
        if self._bank is None:
            return {}
        with self.lock:
            return {m.content_hash: self._bank.content_of(c) for p in paths for c, m in self._bank.chunks_of(p).items()}

    def _unbank(self, paths: Iterable[str]) -> None:
        """Drop the bank's chunks of `paths`."""
        if self._bank is None:
            return
        with self.lock:
            for path in paths:
                self._bank.remove_file(path)

    # -- incremental ----------------------------------------------------------------------------

    def update(self, paths: Iterable[str | os.PathLike], progress: ProgressFn | None = None) -> IndexSummary:
        """Re-index just these paths (files or directories; created, changed, moved or deleted)."""
        t0, summary, changed = time.perf_counter(), IndexSummary(), []
        stored = {f.path for f in self.store.files()}
        self._trust_mtime = self.store.meta().get(CONTENT_RULES) == self._content_rules()
        for rel in sorted({self._relative(p) for p in paths} - {None}):
            target = self.root / rel
            if target.is_dir():
                for d in walk_with_skips(self.root, self.rules, read=False):
                    if d.file is not None and d.file.path.startswith(rel.rstrip("/") + "/"):
                        changed += [d.file.path] if self._scan_file(d.file.path, d.file.abs_path, summary) else []
                continue
            decision = explain(self.root, rel, self.rules, read=False) if target.exists() else None
            if decision is not None and decision.file is not None:
                changed += [rel] if self._scan_file(rel, decision.file.abs_path, summary) else []
            else:  # deleted, moved away, or now ignored: drop it and anything stored below it
                for path in [p for p in stored if p == rel or p.startswith(rel.rstrip("/") + "/")]:
                    self._forget(path)
                    summary.files_deleted += 1
        summary.files_changed = len(changed)
        self._encode_edits_first(summary, progress, changed)
        if changed or summary.files_deleted:
            # the memories the edit replaced (a save re-encodes the chunks after the edit too): kept until the
            # next full pass, a day of saves under `longllama watch` grew the index by gigabytes
            self.store.gc()
        summary.files_indexed, summary.chunks = self.store.totals()  # the repository's, as a pass says them
        summary.seconds = time.perf_counter() - t0
        return summary

    def _encode_edits_first(self, summary: IndexSummary, progress: ProgressFn | None, changed: list[str]) -> None:
        """Encode the new text of `changed` and bank it before re-encoding the chunks after it (whose
        text is unchanged, only the text before it): the edit reaches every completion after one or two
        chunk encodes instead of all of them (the others keep their old memory meanwhile)."""
        run = _Run(time.perf_counter(), 0, progress)
        held = self._banked(changed)
        if held:
            self._encode_missing(summary, progress, set(changed), run, select=lambda r: r.content_hash not in held)
            self._refresh_bank(changed)
        self._encode_missing(summary, progress, run=run)
        self._refresh_bank(changed)

    def chunk(self, path: str, text: str) -> list[BufferChunk]:
        """An open buffer of `path` (relative) cut and keyed as `_scan_file` cuts the file: an unchanged chunk
        after unchanged text has its indexed chunk's memory key (repository.MemorySource)."""
        chunked = chunk_file(path, text.encode("utf-8", "surrogatepass"), self._buffer_token_counts,
                             self.chunk_tokens)
        out, at = [], 0
        for c, context in keyed(chunked.chunks, self.context_chars):  # they cover the text in order
            out.append(BufferChunk(path, at, at + len(c.text), c.start_line, c.end_line, c.symbol, c.text,
                                   c.content_hash, c.token_count, memory_key=c.memory_key, context=context))
            at += len(c.text)
        return out

    @functools.cached_property
    def _buffer_token_counts(self) -> Callable[[str], int]:
        """count_tokens, remembered by text: a buffer is cut again at every keystroke, and the tokenizer
        was 75% of a 30 ms cut of requests/sessions.py, for pieces the previous keystroke counted."""
        return functools.lru_cache(maxsize=4096)(self.encoder.count_tokens)

    def _relative(self, path: str | os.PathLike) -> str | None:
        p = Path(path)
        p = p if p.is_absolute() else self.root / p
        try:
            rel = p.resolve().relative_to(self.root) if p.exists() else p.relative_to(self.root)
        except ValueError:
            return None  # outside the repository
        if printable_path(rel.as_posix()) != rel.as_posix():
            return None  # an undecodable name: the full pass records it as skipped
        return rel.as_posix() if str(rel) != "." else None

    # -- watching -------------------------------------------------------------------------------

    def start_watching(self, debounce: float = 0.3, on_update: Callable[[IndexSummary], None] | None = None):
        """Keep the index current as files change; a read-only index follows what its writer commits."""
        from indexer.watcher import Watcher

        if self._watcher is None and self.store.readonly:
            self._watcher = _Follower(self, debounce, on_update)
            self._watcher.start()
        if self._watcher is None:
            self._watcher = Watcher(self.root, self.update, debounce=debounce, on_update=on_update)
            self._watcher.start()
            self.state = "watching"
        return self._watcher

    def take_over(self, follower: _Follower) -> bool:
        """A read-only index whose writer has stopped: write it from here on. What changed since the
        writer last indexed is indexed, then file events are watched instead of the writer's commits.
        False while the writer is still there."""
        if not self.store.take_over():  # the bank's lock is not needed: the bank is untouched
            return False
        logger.warning("the index of %s is no longer written by another process: this one writes it now",
                       self.root)
        self._followed = {}
        summary = self.index()
        if follower.stopped or self._watcher is not follower:
            return True  # closed meanwhile: nothing to watch
        self._watcher = None
        self.start_watching(follower.debounce, follower.on_update)
        if follower.on_update is not None:
            follower.on_update(summary)
        return True

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def status(self) -> dict:
        stats = self.store.stats()
        bank = self._bank.status() if self._bank is not None else None
        return {"root": str(self.root), "state": self.state, "files": stats.files, "chunks": stats.chunks,
                "tokens": stats.tokens, "memory_tokens": bank.live_tokens if bank else 0, "bytes_on_disk": stats.bytes_on_disk,
                "db": stats.path, "fingerprint": stats.fingerprint, "chunks_missing_memory": stats.chunks_missing_memory,
                "skipped": stats.skipped, "bank": bank}
