"""The index store: one SQLite database per (repository, model) holding files, chunks and memories.

    with Store.open(index_path(root, fp), fp) as store:          # the one writer (lock file)
        rows = store.replace_file(file_row, chunks)              # one transaction per file
        todo = store.missing_memories(r.memory_key for r in rows)
        store.put_memories({h: encode(h) for h in todo})         # batched transactions
    with Store.open(path, fp, readonly=True) as reader: ...      # never blocked (WAL snapshot)

Durability: WAL with synchronous=NORMAL. Every commit is atomic and survives a killed process (the
WAL is in the OS page cache); only a power loss can drop the last few commits, never corrupt the
file. The index is a cache of the repository, so losing a commit costs re-encoding a few chunks,
while FULL would fsync on every per-file commit.

Garbage collection: memories are content-addressed, so a memory whose chunks vanish (file deleted,
branch switched) is kept until `gc()`. The pipeline calls `gc()` once at the end of a full
indexing pass, never during per-file updates, so content that comes back (branch switched back,
code moved in two steps) is not re-encoded.

Trust: a repository may ship a `.longllama/` of its own. The lock and database are opened without
following symlinks, a `.longllama` that is a symlink or another user's is refused, it gets a
`.gitignore` of `*`, and every memory row carries a MAC under this user's key (indexer.signing): a
database this user did not write has its memories dropped on open, and a row with a bad MAC is never
returned, so the pipeline encodes that content again.

Memory tensors live in BLOB rows rather than in side files (unlike house style 19) so a chunk, its
memory and the file row commit in one SQLite transaction: kill -9 can never leave a half-written
tensor file or an orphan. Cold reads measured ~680 MiB/s (environment.md §6).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlite_utils import Database

from indexer.schema import (
    CHUNK_INPUT_FIELDS,
    SCHEMA_VERSION,
    STORE_ENCODING,
    ChunkRow,
    FileRow,
    Fingerprint,
    decode_memory,
    encode_memory,
    migrations,
)
from indexer.signing import sign, user_key, verify
from longllama_lsp.errors import IndexBusy, StoreError, StoreMismatch, StoreOutdated
from longllama_lsp.safefile import UnsafeFile, open_regular

if TYPE_CHECKING:
    from longllama_lsp.model.memory import Memory

logger = logging.getLogger(__name__)

MEMORY_COLUMNS = "memory_key, dtype, shape, layers, mask, data, mac, encoding"
SIDE_FILES = ("-wal", "-shm", "-journal")  # SQLite opens these by name, beside the database
REBUILD_HINT = "run `longllama index --rebuild` to delete and rebuild it"
COMPACT_MIN_FREE_BYTES = 32 << 20  # Store.compact: less free space than this is not worth rewriting the file
CHUNK_COLUMNS = ", ".join(ChunkRow.__dataclass_fields__)
FILE_COLUMNS = ", ".join(FileRow.__dataclass_fields__)


def index_path(root: str | os.PathLike, fingerprint: Fingerprint) -> Path:
    """Default database location: <root>/.longllama/index-<fingerprint[:12]>.db."""
    return Path(root) / ".longllama" / f"index-{fingerprint.digest[:12]}.db"


@dataclass
class StoreStats:
    """What `longllama status` shows."""

    path: str
    fingerprint: str
    model: dict[str, Any]
    schema_version: int
    files: int  # indexed files
    chunks: int
    tokens: int  # sum of chunk token counts
    memories: int  # distinct encoded contents
    memory_bytes: int
    chunks_missing_memory: int
    bytes_on_disk: int  # db + wal + shm
    skipped: list[tuple[str, str | None]] = field(default_factory=list)  # (path, reason)


class _WriterLock:
    """Exclusive flock on <db>.lock; released by the kernel when the process dies, even on kill -9."""

    def __init__(self, db_path: Path):
        self.path = db_path.with_name(db_path.name + ".lock")
        # O_NOFOLLOW: a committed `index-….db.lock` symlink must not make us write a PID through it.
        self.fd = _open_regular(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise IndexBusy(db_path, holder) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1


def _open_regular(path: Path, flags: int) -> int:
    """os.open without following a symlink at `path`, and only onto a regular file."""
    try:
        return open_regular(path, flags, 0o644)
    except UnsafeFile as e:
        raise StoreError(f"{e}; the index never opens one (a repository may ship it to make us overwrite "
                         "another file): delete it") from None


def _check_index_dir(directory: Path) -> None:
    """Refuse a `.longllama` that is a symlink, another user's, or writable by everyone: its contents
    would decide where we write and what the model reads."""
    try:
        st = directory.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise StoreError(f"{directory} is a symlink (a repository may ship one to redirect the index); "
                         "delete it and index again")
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{directory} is not a directory; delete it and index again")
    if st.st_uid != os.geteuid():
        raise StoreError(f"{directory} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}); "
                         "its index could be anyone's: delete it, or index as its owner")
    if st.st_mode & stat.S_IWOTH:
        raise StoreError(f"{directory} is writable by every user (mode {stat.filemode(st.st_mode)}); "
                         "run `chmod o-w` on it or delete it")


def disk_bytes(path: Path) -> int:
    """Bytes of an index database on disk: the file, its WAL and shared memory (regular files only)."""
    sizes = (os.lstat(p) for p in (Path(path), Path(f"{path}-wal"), Path(f"{path}-shm")) if os.path.lexists(p))
    return sum(st.st_size for st in sizes if stat.S_ISREG(st.st_mode))


def delete_index(path: Path) -> int:
    """Delete an index database with its side files and lock file, under its writer lock (IndexBusy while
    a process writes it); the bytes freed. Links in `.longllama/` are removed, never followed."""
    _check_index_dir(path.parent)
    freed = disk_bytes(path)
    lock = _WriterLock(path)
    try:
        for p in (path, *(Path(f"{path}{suffix}") for suffix in SIDE_FILES), lock.path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()  # the lock file last: a writer that opens it now finds no database to keep
    finally:
        lock.release()
    return freed


def _check_side_files(path: Path) -> None:
    """The files SQLite opens beside the database by name must not be symlinks (the database itself is
    opened with _open_regular first)."""
    for p in (Path(f"{path}{suffix}") for suffix in SIDE_FILES):
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{p} is {'a symlink' if stat.S_ISLNK(st.st_mode) else 'not a regular file'}; "
                             "the index never opens one (a repository may ship it): delete it")


def _write_gitignore(directory: Path) -> None:
    """`.longllama/.gitignore` = `*`: the index is never committed (and never shipped to others)."""
    try:
        fd = os.open(directory / ".gitignore", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        return
    except OSError as e:  # a read-only checkout: the index itself will say what is wrong
        logger.info("cannot write %s/.gitignore: %s", directory, e)
        return
    with os.fdopen(fd, "w") as f:
        f.write("# written by longllama: the index is a per-machine cache, never committed\n*\n")


@contextlib.contextmanager
def _sqlite_errors(path: Path, action: str) -> Iterator[None]:
    """Turn sqlite3 failures into StoreError with what to do; the transaction is already rolled back."""
    try:
        yield
    except sqlite3.Error as e:
        msg = str(e)
        if "full" in msg:
            hint = "free disk space and index again; nothing written since the last completed file was kept"
        elif "readonly" in msg or "read-only" in msg:
            hint = "the database or its directory is read-only; fix the permissions or open it read-only"
        elif "locked" in msg or "busy" in msg:
            hint = "another connection holds the database; try again"
        else:  # malformed, not a database, I/O error: the file is damaged
            hint = f"the index is damaged; {REBUILD_HINT}"
        raise StoreError(f"index {path}: {action} failed: {msg}; {hint}") from e


def _reads(method):
    """Wrap a Store method's SQLite errors (a damaged page shows only when read) like open's."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _sqlite_errors(self.path, "read"):
            return method(self, *args, **kwargs)
    return wrapper


class Store:
    """The index database; use `Store.open(...)` as a context manager.

    One connection: use a Store from one thread at a time (the indexer's), readers open their own.
    """

    def __init__(self, path: Path, fingerprint: Fingerprint, db: Database, readonly: bool,
                 lock: _WriterLock | None):
        self.path, self.fingerprint, self.db, self.readonly = path, fingerprint, db, readonly
        self._lock = lock
        self._key = user_key()
        self.distrusted = 0  # memories dropped on open: the database was not written by this user

    # -- lifetime -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, fingerprint: Fingerprint | None, *, readonly: bool = False,
             rebuild: bool = False) -> Store:
        """Open (creating and migrating if needed) the index; readers don't take the writer lock.

        A reader may pass fingerprint=None to adopt the stored one (inspection only). `rebuild`
        deletes the database (under the writer lock) and starts an empty one.
        Raises IndexBusy if another process is writing, StoreMismatch if another model built it,
        StoreError if it cannot be opened or trusted.
        """
        path = Path(path).absolute()
        if path.parent.name == ".longllama":
            _check_index_dir(path.parent)
        if readonly:
            if not path.exists():
                raise StoreError(f"no index at {path}; run `longllama index` first")
            try:
                os.close(_open_regular(path, os.O_RDONLY))
            except OSError as e:
                raise StoreError(f"cannot open index at {path}: {e}") from e
            _check_side_files(path)
            return cls._connect(path, fingerprint, readonly=True, lock=None)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.parent.name == ".longllama":
                _write_gitignore(path.parent)
            lock = _WriterLock(path)
        except OSError as e:
            raise StoreError(f"cannot create index at {path}: {e}") from e
        try:
            if rebuild:
                for p in (path, *(Path(f"{path}{suffix}") for suffix in SIDE_FILES)):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()  # unlink removes a symlink itself, never its target
            os.close(_open_regular(path, os.O_RDWR | os.O_CREAT))
            _check_side_files(path)
            return cls._connect(path, fingerprint, readonly=False, lock=lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _connect(cls, path: Path, fp: Fingerprint, readonly: bool, lock: _WriterLock | None) -> Store:
        with _sqlite_errors(path, "open"):
            if readonly:
                conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None,
                                       check_same_thread=False)
            else:
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db = Database(conn)
            db.execute("PRAGMA busy_timeout = 5000")
            store = cls(path, fp, db, readonly, lock)
            try:
                store._setup()
            except BaseException:
                conn.close()
                raise
        return store

    def _setup(self) -> None:
        if self.readonly:
            pending = migrations.pending(self.db)
            if pending:
                raise StoreOutdated(f"index {self.path} has an older schema ({[m.name for m in pending]} "
                                 "pending); run `longllama index` once to upgrade it")
        else:
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"index {self.path}: cannot enable WAL (journal_mode={mode})")
            self.db.execute("PRAGMA synchronous = NORMAL")  # see module docstring
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA journal_size_limit = 67108864")  # truncate the WAL back to 64 MiB
            with self.db.atomic():  # migrations and the model's meta rows commit together, or not at all
                migrations.apply(self.db)
                self._init_meta()
                self._claim()
        self._check_meta()

    def _init_meta(self) -> None:
        known = {m.name for m in migrations._migrations}
        unknown = [m.name for m in migrations.applied(self.db) if m.name not in known]
        if unknown:
            raise StoreError(f"index {self.path} was made by a newer longllama (migrations {unknown})")
        rows = {"fingerprint": self.fingerprint.digest, "fingerprint_details": self.fingerprint.to_json(),
                "created_at": str(time.time())}
        for key, value in rows.items():
            self.db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", [key, value])
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                        [str(SCHEMA_VERSION)])

    def _claim(self) -> None:
        """Drop every memory of a database this user's key did not mark (shipped in a repository,
        copied from another machine, or older than signing), then mark it as ours."""
        meta = self.meta()
        db_id = meta.get("db_id", "")
        with contextlib.suppress(ValueError):  # a forged owner_mac may not even be hex
            if db_id and verify(self._key, bytes.fromhex(meta.get("owner_mac", "")), "owner", db_id):
                return
        self.distrusted = self.db.execute("DELETE FROM memories").rowcount
        if self.distrusted:
            logger.warning("index %s was not written by this user on this machine: its %d memories are not "
                           "trusted and will be encoded again", self.path, self.distrusted)
        db_id = secrets.token_hex(16)
        for key, value in (("db_id", db_id), ("owner_mac", sign(self._key, "owner", db_id).hex())):
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [key, value])

    def _check_meta(self) -> None:
        meta = self.meta()
        theirs = meta.get("fingerprint")
        if self.fingerprint is None and self.readonly:  # a reader that only inspects (longllama status)
            self.fingerprint = Fingerprint.from_json(meta["fingerprint_details"])
        if theirs != self.fingerprint.digest:
            raise StoreMismatch(
                f"index {self.path} was built by model {theirs} ({meta.get('fingerprint_details')}), "
                f"not by the loaded model {self.fingerprint.digest} ({self.fingerprint.to_json()}); "
                f"use the loaded model's own index ({self.path.with_name(index_path('', self.fingerprint).name)})"
                " or delete this file")

    def close(self) -> None:
        if self.db is None:
            return
        if not self.readonly:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # best effort: readers may hold it
                self.db.execute("PRAGMA optimize")
        self.db.conn.close()
        self.db = None  # type: ignore[assignment]
        if self._lock is not None:
            self._lock.release()

    def take_over(self) -> bool:
        """A read-only store becomes the writer once the process that wrote it has stopped (its lock,
        a read-write connection); False while that process still writes. A server beside
        `longllama watch` would otherwise stay read-only, and miss every later edit, after watch ends."""
        if not self.readonly:
            return True
        try:
            writer = Store.open(self.path, self.fingerprint)
        except IndexBusy:
            return False
        reader = self.db
        self.db, self._lock, self.readonly = writer.db, writer._lock, False
        self.distrusted += writer.distrusted
        reader.conn.close()
        return True

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Store]:
        """Group writes into one atomic commit (nested calls become savepoints)."""
        if self.readonly:
            raise StoreError(f"index {self.path} is open read-only")
        with _sqlite_errors(self.path, "write"), self.db.atomic():
            yield self

    # -- files and chunks -----------------------------------------------------------------------

    def replace_file(self, file: FileRow, chunks: Sequence[Any] = ()) -> list[ChunkRow]:
        """Atomically set one file's row and chunks (any objects with Chunk's attributes, in order)."""
        if file.status == "skipped" and chunks:
            raise ValueError(f"{file.path}: a skipped file cannot have chunks")
        values = [_chunk_values(file.path, i, c) for i, c in enumerate(chunks)]
        row = {**vars(file), "indexed_at": time.time()}
        with self.transaction():
            self.db.execute("DELETE FROM chunks WHERE path = ?", [file.path])
            self.db.execute(f"INSERT OR REPLACE INTO files ({FILE_COLUMNS}) VALUES "
                            f"({', '.join('?' * len(row))})", list(row.values()))
            self.db.conn.executemany(
                f"INSERT INTO chunks ({CHUNK_COLUMNS}) VALUES (NULL, {', '.join('?' * 11)})", values)
        return self.chunks(file.path)

    def delete_file(self, path: str) -> bool:
        """Forget a file and its chunks (their memories stay until gc)."""
        with self.transaction():
            self.db.execute("DELETE FROM chunks WHERE path = ?", [path])
            return self.db.execute("DELETE FROM files WHERE path = ?", [path]).rowcount > 0

    @_reads
    def file(self, path: str) -> FileRow | None:
        row = self.db.execute(f"SELECT {FILE_COLUMNS} FROM files WHERE path = ?", [path]).fetchone()
        return FileRow(*row) if row else None

    @_reads
    def files(self) -> list[FileRow]:
        return [FileRow(*r) for r in self.db.execute(f"SELECT {FILE_COLUMNS} FROM files ORDER BY path")]

    @_reads
    def chunks(self, path: str | None = None) -> list[ChunkRow]:
        """Chunks of one file (or all), in (path, ordinal) order."""
        where, args = ("WHERE path = ?", [path]) if path is not None else ("", [])
        sql = f"SELECT {CHUNK_COLUMNS} FROM chunks {where} ORDER BY path, ordinal"
        return [ChunkRow(*r) for r in self.db.execute(sql, args)]

    @_reads
    def chunks_missing_memory(self, paths: Iterable[str] | None = None) -> list[ChunkRow]:
        """Chunks (of `paths`, or all) whose memory key has no memory yet (what a resumed run must encode).

        `paths` filter in SQL, through the (path, ordinal) index: a pass asks once per priority tier."""
        cols = ", ".join(f"c.{c}" for c in ChunkRow.__dataclass_fields__)
        where, args = ("AND c.path IN (SELECT value FROM json_each(?))", [json.dumps(list(paths))]) \
            if paths is not None else ("", [])
        sql = (f"SELECT {cols} FROM chunks c LEFT JOIN memories m ON m.memory_key = c.memory_key "
               f"WHERE m.memory_key IS NULL {where} ORDER BY c.path, c.ordinal")
        return [ChunkRow(*r) for r in self.db.execute(sql, args)]

    # -- memories -------------------------------------------------------------------------------

    @_reads
    def missing_memories(self, keys: Iterable[str]) -> set[str]:
        """The subset of memory `keys` with no stored memory (what still needs the model)."""
        sql = ("SELECT DISTINCT value FROM json_each(?) "
               "WHERE value NOT IN (SELECT memory_key FROM memories)")
        return {r[0] for r in self.db.execute(sql, [json.dumps(list(keys))])}

    def put_memories(self, memories: Mapping[str, Memory], *, batch_bytes: int = 64 << 20,
                     encoding: str = STORE_ENCODING) -> int:
        """Store memories by memory key (already stored ones are kept); returns how many were new.

        `encoding` (schema.ENCODINGS): int8 rows by default; 'raw' stores the bank dtype's bits as they are.
        Commits every ~batch_bytes, so a kill loses at most one batch of encoding work.
        """
        added, pending, size = 0, [], 0
        for memory_key, memory in memories.items():
            row, mask, data = encode_memory(memory, self.fingerprint, encoding)
            mac = self._mac(memory_key, row["dtype"], row["shape"], row["layers"], mask, data, row["encoding"])
            pending.append([memory_key, self.fingerprint.digest, row["n_tokens"], row["dtype"],
                            row["shape"], row["layers"], row["nbytes"], time.time(), mask, data, mac,
                            row["encoding"]])
            size += row["nbytes"]
            if size >= batch_bytes:
                added, pending, size = added + self._insert_memories(pending), [], 0
        return added + self._insert_memories(pending)

    def _insert_memories(self, rows: list[list]) -> int:
        if not rows:
            return 0
        with self.transaction():
            before = self.db.conn.total_changes
            self.db.conn.executemany(
                "INSERT OR IGNORE INTO memories (memory_key, fingerprint, n_tokens, dtype, shape, layers, "
                "nbytes, created_at, mask, data, mac, encoding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            return self.db.conn.total_changes - before

    def get_memory(self, memory_key: str) -> Memory | None:
        return next((m for _, m in self.iter_memories([memory_key])), None)

    def iter_memories(self, keys: Iterable[str] | None = None, *, batch: int = 8
                      ) -> Iterator[tuple[str, Memory]]:
        """Stream (memory key, Memory) in storage order; keys with no memory are skipped.

        `batch` rows are fetched at a time (larger batches only hold more blobs in RAM). Decoding is
        one bytearray copy per blob: ~400 MiB/s against ~550 MiB/s for bare SQLite reads (warm cache).
        A row whose MAC does not verify is skipped (and, by the writer, deleted: encoded again).
        """
        with _sqlite_errors(self.path, "read"):
            yield from self._iter_memories(keys, batch)

    def _iter_memories(self, keys: Iterable[str] | None, batch: int) -> Iterator[tuple[str, Memory]]:
        if keys is None:
            cur = self.db.execute(f"SELECT {MEMORY_COLUMNS} FROM memories WHERE fingerprint = ? "
                                  "ORDER BY rowid", [self.fingerprint.digest])
            yield from self._decode_rows(cur, batch)
            return
        # Look the rowids up in the primary-key index first: `ORDER BY rowid` on the joined query would
        # make SQLite sort whole rows, blobs included, before returning the first one.
        rowids = sorted(r[0] for r in self.db.execute(
            "SELECT rowid FROM memories WHERE fingerprint = ? AND memory_key IN "
            "(SELECT value FROM json_each(?))",
            [self.fingerprint.digest, json.dumps(list(keys))]))
        for i in range(0, len(rowids), 4096):
            cur = self.db.execute(f"SELECT {MEMORY_COLUMNS} FROM memories WHERE rowid IN "
                                  "(SELECT value FROM json_each(?))", [json.dumps(rowids[i:i + 4096])])
            yield from self._decode_rows(cur, batch)

    def _mac(self, *row: str | bytes | None) -> bytes:
        return sign(self._key, *self._signed(*row))

    def _signed(self, memory_key: str, dtype: str, shape: str, layers: str, mask: bytes | None, data: bytes,
                encoding: str) -> tuple[str | bytes | None, ...]:
        # The encoding is signed too (relabelling int8 bytes as raw must not verify); a raw row signs
        # without it, so rows written before migration 3 keep their MACs.
        extra = () if encoding == "raw" else (encoding,)
        return (self.fingerprint.digest, memory_key, dtype, shape, layers, mask, data, *extra)

    def _decode_rows(self, cur: sqlite3.Cursor, batch: int) -> Iterator[tuple[str, Memory]]:
        forged = []
        while rows := cur.fetchmany(batch):
            for memory_key, dtype, shape, layers, mask, data, mac, encoding in rows:
                if not verify(self._key, mac, *self._signed(memory_key, dtype, shape, layers, mask, data, encoding)):
                    forged.append(memory_key)
                    continue
                try:
                    memory = decode_memory(dtype, shape, layers, mask, data, encoding)
                except ValueError as e:
                    raise StoreError(f"index {self.path}: memory {memory_key} is corrupt ({e}); "
                                     f"{REBUILD_HINT}") from e
                yield memory_key, memory
        if forged:
            logger.warning("index %s: %d memories were not signed by this user; not used%s", self.path,
                           len(forged), "" if self.readonly else ", deleted to be encoded again")
            if not self.readonly:
                with self.transaction():
                    self.db.conn.executemany("DELETE FROM memories WHERE memory_key = ?", [[k] for k in forged])

    def gc(self) -> int:
        """Delete memories no chunk references; returns how many. Run after a full indexing pass."""
        with self.transaction():
            return self.db.execute(
                "DELETE FROM memories WHERE memory_key NOT IN (SELECT memory_key FROM chunks)").rowcount

    def compact(self, min_free_bytes: int | None = None) -> int:
        """Give the file's free pages back to the disk when they are most of it and at least `min_free_bytes`
        (None: COMPACT_MIN_FREE_BYTES). SQLite reuses free pages but never shrinks the file: WTForms' index kept
        98 of its 142 MB free after its translation catalogs went. The bytes freed; 0 when not worth it or when
        SQLite refuses (logged). It rewrites the live rows (WTForms' 43 MB: the whole `longllama index` took
        3.1 s), so it runs after a full pass, never per edit."""
        if self.readonly:
            return 0
        min_free_bytes = COMPACT_MIN_FREE_BYTES if min_free_bytes is None else min_free_bytes
        page = self.db.execute("PRAGMA page_size").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0] * page
        if free < min_free_bytes or 2 * free < self.db.execute("PRAGMA page_count").fetchone()[0] * page:
            return 0
        before = disk_bytes(self.path)
        try:
            self.db.execute("VACUUM")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # VACUUM wrote the whole file through the WAL
        except sqlite3.Error as err:  # best effort, as close()'s checkpoint: the space stays reusable
            logger.info("index %s not compacted: %s", self.path, err)
            return 0
        return max(0, before - disk_bytes(self.path))

    # -- status ---------------------------------------------------------------------------------

    @_reads
    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, key: str, value: str) -> None:
        """Record a descriptive meta row (never the fingerprint rows, which are checked on open)."""
        if key in ("fingerprint", "fingerprint_details", "schema_version"):
            raise ValueError(f"meta key {key!r} is written by the store itself")
        with _sqlite_errors(self.path, "write meta"):
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [key, value])

    @_reads
    def data_version(self) -> int:
        """Changes whenever another connection commits (SQLite's PRAGMA data_version): a reader's cue."""
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    @_reads
    def file_signatures(self) -> dict[str, tuple[str | None, int]]:
        """{path: (content hash, chunks whose memory is stored)} of every indexed file: what changes
        when a writer re-indexes a file, and again when it stores the file's memories."""
        files = dict(self.db.execute("SELECT path, content_hash FROM files WHERE status = 'indexed'"))
        encoded = dict(self.db.execute(
            "SELECT c.path, count(m.memory_key) FROM chunks c "
            "LEFT JOIN memories m ON m.memory_key = c.memory_key GROUP BY c.path"))
        return {path: (digest, encoded.get(path, 0)) for path, digest in files.items()}

    @_reads
    def totals(self) -> tuple[int, int]:
        """(indexed files, chunks): a pass's summary line, without reading the rows."""
        files, = self.db.execute("SELECT count(*) FROM files WHERE status = 'indexed'").fetchone()
        chunks, = self.db.execute("SELECT count(*) FROM chunks").fetchone()
        return files, chunks

    @_reads
    def stats(self) -> StoreStats:
        one = lambda sql: self.db.execute(sql).fetchone()  # noqa: E731
        files, = one("SELECT count(*) FROM files WHERE status = 'indexed'")
        chunks, tokens = one("SELECT count(*), coalesce(sum(token_count), 0) FROM chunks")
        memories, mem_bytes = one("SELECT count(*), coalesce(sum(nbytes), 0) FROM memories")
        skipped = self.db.execute("SELECT path, skip_reason FROM files WHERE status = 'skipped' "
                                  "ORDER BY path").fetchall()
        on_disk = disk_bytes(self.path)
        meta = self.meta()
        return StoreStats(path=str(self.path), fingerprint=meta["fingerprint"],
                          model=json.loads(meta["fingerprint_details"]),
                          schema_version=int(meta["schema_version"]), files=files, chunks=chunks,
                          tokens=tokens, memories=memories, memory_bytes=mem_bytes,
                          chunks_missing_memory=len(self.chunks_missing_memory()), bytes_on_disk=on_disk,
                          skipped=[tuple(r) for r in skipped])

    @_reads
    def check(self) -> list[str]:
        """Problems found by SQLite's integrity and foreign-key checks ([] = healthy)."""
        problems = [r[0] for r in self.db.execute("PRAGMA integrity_check") if r[0] != "ok"]
        problems += [f"foreign key: {tuple(r)}" for r in self.db.execute("PRAGMA foreign_key_check")]
        return problems


def _chunk_values(path: str, ordinal: int, chunk: Any) -> list:
    """Validate one chunk (a chunker Chunk or anything with its attributes) into a chunks row."""
    chunk_path = getattr(chunk, "path", path)
    if chunk_path != path:
        raise ValueError(f"chunk {ordinal} belongs to {chunk_path!r}, not {path!r}")
    try:
        values = [getattr(chunk, f) for f in CHUNK_INPUT_FIELDS[:-1]]
    except AttributeError as e:
        raise ValueError(f"{path} chunk {ordinal}: {e}") from e
    # No memory key: a chunk encoded alone, whose key is its content hash (indexer.encoder.memory_key).
    values.append(getattr(chunk, "memory_key", None) or values[-1])
    for name, h in zip(CHUNK_INPUT_FIELDS[-2:], values[-2:], strict=True):
        if not (isinstance(h, str) and len(h) == 64):
            raise ValueError(f"{path} chunk {ordinal}: {name} must be 64 hex chars, got {h!r}")
    return [path, ordinal, *values]
