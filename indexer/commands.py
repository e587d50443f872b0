"""`longllama index`, `longllama watch`, `longllama status`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from longllama_lsp.cli import (
    Command,
    ProgressBars,
    add_model_arguments,
    add_repository_argument,
    ready_line,
    repository_problem,
    shown,
)


def load_model_for(args: argparse.Namespace, model_dir: Path):
    """The resolved checkpoint's model, on --device in --dtype: this process only indexes, so the
    encoder runs on this thread, with no decode weight copies (the LazyEncoder has the tokenizer)."""
    from longllama_lsp.load import load_resolved_model

    return load_resolved_model(model_dir, args.device, args.dtype, decoding=False)[0]


def _device(args: argparse.Namespace) -> str:
    from longllama_lsp.load import resolve_device_dtype

    return resolve_device_dtype(args.device, args.dtype)[0]


def root_problem(command: str, root: str) -> int:
    """0 when `root` is a directory; else says so on stderr and returns 2 (usage error), creating nothing."""
    if problem := repository_problem(root):
        print(f"longllama {command}: error: {problem}", file=sys.stderr)
        return 2
    return 0


def open_indexer(args: argparse.Namespace, *, keep_memory: bool = True):
    """An Indexer whose model loads only when a chunk needs encoding (a no-op run never loads it).

    keep_memory=False (one-shot `index`): no bank, nothing on the device; the database is the product.
    """
    from indexer.encoder import LazyEncoder
    from indexer.pipeline import Indexer
    from longllama_lsp.resolve import resolve_model

    root = Path(args.repo)
    model_dir = resolve_model(args.model)
    encoder = LazyEncoder(model_dir, lambda: load_model_for(args, model_dir))
    return Indexer.open_checkpoint(root, model_dir, encoder, device=_device(args) if keep_memory else None,
                                   rules=walk_rules(args), budget_tokens=args.memory_budget,
                                   chunk_tokens=args.chunk_tokens, rebuild=getattr(args, "rebuild", False))


def walk_rules(args: argparse.Namespace):
    from indexer.walker import WalkRules

    return WalkRules(max_bytes=int(args.max_file_kb * 1024), include_secrets=args.include_secrets)


def _add_index_arguments(p: argparse.ArgumentParser) -> None:
    add_repository_argument(p, "repository to index", positional_alias=True)
    p.add_argument("--first", action="append", metavar="PATH",
                   help="index this file (e.g. the one open in your editor), then what it imports, then recently "
                        "changed files (git), before the rest: their memory is usable long before the whole "
                        "repository is; repeatable")
    add_model_arguments(p)
    p.add_argument("--chunk-tokens", type=int, default=256, help="token budget per chunk (default: 256)")
    p.add_argument("--max-file-kb", type=float, default=1024, help="skip files larger than this (default: 1024 KiB)")
    p.add_argument("--memory-budget", type=int, default=None, metavar="TOKENS",
                   help="most memory tokens kept on the device (default: no limit)")
    p.add_argument("--include-secrets", action="store_true",
                   help="also index .env files, keys and files that look like they hold credentials (off by default)")


class ProgressLines:
    """Plain lines on stderr, at most one per `every_s` (a log, CI, a multiplexer pane: no terminal).

    A line: `encoding: 1210/4863 chunks, 31 968/239 114 tokens, 162 tokens/s, ETA 21 min`. The first
    scan line, every 'ready' event and the last line of each phase are always printed.
    """

    def __init__(self, every_s: float = 10.0, clock=time.monotonic):
        self.every_s, self.clock, self.last, self.phase = every_s, clock, None, None
        self.finished: tuple | None = None  # (phase, total) whose last line is printed

    def __call__(self, p) -> None:
        now = self.clock()
        if p.phase == "ready":
            self._print(ready_line(p), now)
            return
        due = self.last is None or now - self.last >= self.every_s or p.phase != self.phase
        self.phase = p.phase
        if p.done >= p.total and self.finished == (p.phase, p.total):
            return  # a batch's end reports the phase's end again: one last line is enough
        if due or p.done >= p.total:
            self._print(progress_line(p), now)
            self.finished = (p.phase, p.total) if p.done >= p.total else None

    def _print(self, line: str, now: float) -> None:
        print(line, file=sys.stderr, flush=True)
        self.last = now

    def close(self) -> None:
        pass


def progress_line(p) -> str:
    if p.phase == "scan":
        return f"scanning: {p.done}/{p.total} files"
    eta = p.eta_s
    eta_text = "" if eta is None else f", ETA {_duration(eta)}"
    return (f"encoding: {p.done}/{p.total} chunks, {p.tokens}/{p.tokens_total} tokens, "
            f"{p.tokens_per_s:.0f} tokens/s{eta_text}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def progress_reporter(quiet: bool):
    """Bars on a terminal, plain periodic lines otherwise, nothing with -q."""
    if quiet:
        return ProgressBars(enabled=False)
    return ProgressBars() if sys.stderr.isatty() else ProgressLines()


def usable_line(summary, ix) -> str:
    """What a user can do now, in one line."""
    missing = ix.store.stats().chunks_missing_memory
    if missing:
        return (f"usable now: memory of the encoded chunks; {missing} chunks still need encoding "
                "(run `longllama index` again to finish)")
    if not summary.files_indexed:
        skipped = f" ({summary.files_skipped} skipped: `longllama status` says why)" if summary.files_skipped else ""
        return (f"nothing to remember: no file here is one the indexer reads{skipped}; `longllama ask` and "
                "`complete` answer from the model alone")
    ready = "" if summary.ready_seconds is None else \
        f" (the open files' neighbourhood, {summary.ready_files} files, after {summary.ready_seconds:.0f} s)"
    return (f"usable now: all {summary.files_indexed} files are in memory for `longllama ask`, `complete` "
            f"and the language server{ready}")


def run_index(args: argparse.Namespace) -> int:
    from indexer.walker import explain

    if bad := root_problem("index", args.repo):
        return bad
    if args.explain:
        decision = explain(Path(args.repo), Path(args.explain), walk_rules(args))
        print(f"{shown(decision.path or args.explain)}: {'indexed' if decision.indexed else 'not indexed'} "
              f"({shown(decision.reason)})")
        return 0
    report = progress_reporter(args.quiet)
    with open_indexer(args, keep_memory=False) as ix:
        summary = ix.index(progress=report, priority_paths=args.first or ())
        report.close()
        if args.json:
            print(json.dumps({**summary.__dict__, "skipped": summary.skipped}, indent=2))
        else:
            print(f"indexed {shown(ix.root)}: {summary.line()}")
            print(f"database: {shown(ix.store.path)}")
            print(usable_line(summary, ix))
    return 0


def _add_index_only(p: argparse.ArgumentParser) -> None:
    _add_index_arguments(p)
    p.add_argument("--explain", metavar="PATH", help="only say why PATH is or is not indexed, then exit")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress (else bars on a terminal, a plain line every 10 s when stderr is not one)")
    p.add_argument("--rebuild", action="store_true",
                   help="delete this model's index database first and encode everything again (for a damaged index)")


def run_watch(args: argparse.Namespace) -> int:
    if bad := root_problem("watch", args.repo):
        return bad
    report = progress_reporter(quiet=False)
    with open_indexer(args) as ix:
        print(f"indexing {ix.root} ...", file=sys.stderr)
        summary = ix.index(progress=report, priority_paths=args.first or ())
        report.close()
        print(summary.line(), file=sys.stderr)
        print(usable_line(summary, ix), file=sys.stderr)
        ix.start_watching(debounce=args.debounce_ms / 1000,
                          on_update=lambda s: print(f"updated: {s.line()}", file=sys.stderr, flush=True))
        print(f"watching {ix.root} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
    return 0


def _add_watch(p: argparse.ArgumentParser) -> None:
    _add_index_arguments(p)
    p.add_argument("--debounce-ms", type=int, default=300, help="quiet time before a burst of changes is indexed")


def run_status(args: argparse.Namespace) -> int:
    from indexer.schema import CONTEXT_CHARS
    from indexer.store import Store
    from longllama_lsp.errors import StoreError, StoreOutdated

    if bad := root_problem("status", args.repo):
        return bad
    dbs = sorted((Path(args.repo) / ".longllama").glob("index-*.db"))
    if not dbs:
        print(f"{Path(args.repo).resolve()}: not indexed yet (run `longllama index --repo {args.repo}`)")
        return 1
    unusable = 0
    for db in dbs:
        try:
            with Store.open(db, None, readonly=True) as store:
                s, meta = store.stats(), store.meta()
        except StoreOutdated:  # an older version's index: this one builds its own beside it
            _print_outdated(db, args.json)
            if args.delete_stale:
                _delete_stale(db)
            continue
        except StoreError as e:  # one bad file (a repository's symlink, a damaged database): say so, go on
            _print_unusable(db, str(e), args.json)
            unusable += 1
            continue
        stale = None if (s.model.get("context_chars") or 0) == CONTEXT_CHARS else (  # not read by this version
            "its chunks were encoded alone; this version encodes each after the text before it and builds "
            "another index (`longllama index`), so this one can be deleted (`longllama status --delete-stale`)")
        if stale and args.delete_stale:
            _delete_stale(db)
        if args.json:
            print(json.dumps({**s.__dict__, "checkpoint": _checkpoint(meta), "stale": stale}, indent=2, default=str))
            continue
        print(f"index:    {shown(s.path)}")
        print(model_lines(s, meta))
        if stale:
            print(f"  stale:  {stale} ({s.bytes_on_disk / 2**20:.1f} MiB)")
        print(f"files:    {s.files}\nchunks:   {s.chunks} ({s.chunks_missing_memory} not encoded yet)\n"
              f"tokens:   {s.tokens}\non disk:  {s.bytes_on_disk / 2**20:.1f} MiB")
        if s.skipped:
            print(f"skipped:  {len(s.skipped)} files")
            for path, reason in s.skipped[: args.show_skipped]:
                print(f"  {shown(path)}: {shown(reason)}")
    return 1 if unusable else 0


def _delete_stale(db: Path) -> None:
    """--delete-stale: said on stderr (stdout stays the listing, JSON or text)."""
    from indexer.store import delete_index
    from longllama_lsp.errors import StoreError

    try:
        freed = delete_index(db)
    except (StoreError, OSError) as e:  # busy, or a .longllama/ we may not write: kept, said why
        print(f"kept {shown(str(db))}: {shown(str(e))}", file=sys.stderr)
        return
    print(f"deleted {shown(str(db))} ({freed / 2**20:.1f} MiB freed)", file=sys.stderr)


def _print_unusable(db: Path, reason: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"path": str(db), "unusable": reason}, indent=2))
    else:
        print(f"index:    {shown(str(db))}\n  unusable: {shown(reason)}")


def _print_outdated(db: Path, as_json: bool) -> None:
    from indexer.store import disk_bytes

    size = disk_bytes(db)
    note = ("written by an older version of longllama; this version builds and reads its own index "
            "(`longllama index`), so this one can be deleted (`longllama status --delete-stale`)")
    if as_json:
        print(json.dumps({"path": str(db.resolve()), "stale": note, "bytes_on_disk": size}, indent=2))
    else:
        print(f"index:    {shown(str(db.resolve()))}\n  stale:  {note} ({size / 2**20:.1f} MiB)")


def _checkpoint(meta: dict[str, str]) -> dict:
    try:
        return json.loads(meta.get("checkpoint", "{}"))
    except ValueError:
        return {}


def model_lines(s, meta: dict[str, str]) -> str:
    """Which model built the index: name, where it came from, memory layers, how they were trained (as
    the store's metadata says: shown())."""
    ck = _checkpoint(meta)  # written by `longllama index` since issue 19; older indexes lack it
    name = ck.get("name") or s.fingerprint[:12]
    lines = [f"model:    {shown(name)} (fingerprint {shown(s.fingerprint[:12])}, "
             f"mem_layers {shown(s.model.get('mem_layers'))}, {shown(s.model.get('mem_dtype'))})"]
    if ck.get("path"):
        lines.append(f"  path:   {shown(ck['path'])}")
    if ck.get("source"):
        lines.append(f"  source: {shown(ck['source'])}")
    if ck:
        trained = ck.get("memory_training") or "untrained memory layers (answers get worse with memory)"
        lines.append(f"  memory: {shown(trained)}")
    return "\n".join(lines)


def _add_status(p: argparse.ArgumentParser) -> None:
    add_repository_argument(p, "indexed repository", positional_alias=True)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("--show-skipped", type=int, default=20, metavar="N", help="list at most N skipped files")
    p.add_argument("--delete-stale", action="store_true",
                   help="delete the index databases this version no longer reads (those marked stale), "
                        "freeing their disk space; an index another process is writing is kept")


index = Command(_add_index_only, run_index,
                "Walk the repository (honouring .gitignore and .longllamaignore, never secrets), cut files into\n"
                "tree-sitter chunks, and encode each new chunk into the model's memory, after the text before it\n"
                "in its file. The cache lives in REPO/.longllama/ and is keyed by that text and model: re-runs,\n"
                "renames and branch switches cost no model time. Safe to interrupt: the next run resumes.")
watch = Command(_add_watch, run_watch, "Index, then keep the index current as files are created, edited, moved or deleted.")
status = Command(_add_status, run_status, "Show what is indexed (files, chunks, tokens, disk use, model) and what was skipped and why.")
