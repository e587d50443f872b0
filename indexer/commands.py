"""`longllama index`, `longllama watch`, `longllama status`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from longllama_lsp.cli import Command, ProgressBars, add_model_arguments, add_repository_argument


def open_indexer(args: argparse.Namespace):
    """The indexer of --repo on the model of --model / LONGLLAMA_MODEL / the bundled default (this
    process only indexes, so the encoder runs on this thread)."""
    from indexer.pipeline import Indexer
    from indexer.walker import WalkRules
    from longllama_lsp.load import load_model_and_tokenizer

    model, tokenizer, model_dir = load_model_and_tokenizer(args.model, args.device, args.dtype, decoding=False)
    rules = WalkRules(max_bytes=int(args.max_file_kb * 1024), include_secrets=args.include_secrets)
    return Indexer.open(Path(args.repo), model, tokenizer, model_dir, rules=rules,
                        budget_tokens=args.memory_budget, chunk_tokens=args.chunk_tokens,
                        rebuild=getattr(args, "rebuild", False))


def _add_index_arguments(p: argparse.ArgumentParser) -> None:
    add_repository_argument(p, "repository to index", positional_alias=True)
    add_model_arguments(p)
    p.add_argument("--chunk-tokens", type=int, default=256, help="token budget per chunk (default: 256)")
    p.add_argument("--max-file-kb", type=float, default=1024, help="skip files larger than this (default: 1024 KiB)")
    p.add_argument("--memory-budget", type=int, default=None, metavar="TOKENS",
                   help="most memory tokens kept on the device (default: no limit)")
    p.add_argument("--include-secrets", action="store_true",
                   help="also index .env files, keys and files that look like they hold credentials (off by default)")


def run_index(args: argparse.Namespace) -> int:
    from indexer.walker import WalkRules, explain

    if args.explain:
        rules = WalkRules(max_bytes=int(args.max_file_kb * 1024), include_secrets=args.include_secrets)
        decision = explain(Path(args.repo), Path(args.explain), rules)
        print(f"{decision.path or args.explain}: {'indexed' if decision.indexed else 'not indexed'} ({decision.reason})")
        return 0
    bars = ProgressBars(enabled=not args.quiet)
    with open_indexer(args) as ix:
        summary = ix.index(progress=bars)
        bars.close()
        if args.json:
            print(json.dumps({**summary.__dict__, "skipped": summary.skipped}, indent=2))
        else:
            print(f"indexed {ix.root}: {summary.line()}")
            print(f"database: {ix.store.path}")
    return 0


def _add_index_only(p: argparse.ArgumentParser) -> None:
    _add_index_arguments(p)
    p.add_argument("--explain", metavar="PATH", help="only say why PATH is or is not indexed, then exit")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--rebuild", action="store_true",
                   help="delete this model's index database first and encode everything again (for a damaged index)")


def run_watch(args: argparse.Namespace) -> int:
    bars = ProgressBars()
    with open_indexer(args) as ix:
        print(f"indexing {ix.root} ...", file=sys.stderr)
        print(ix.index(progress=bars).line(), file=sys.stderr)
        bars.close()
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
    from indexer.store import Store

    dbs = sorted((Path(args.repo) / ".longllama").glob("index-*.db"))
    if not dbs:
        print(f"{Path(args.repo).resolve()}: not indexed yet (run `longllama index --repo {args.repo}`)")
        return 1
    for db in dbs:
        with Store.open(db, None, readonly=True) as store:
            s = store.stats()
        if args.json:
            print(json.dumps(s.__dict__, indent=2, default=str))
            continue
        print(f"index:    {s.path}\nmodel:    {s.model.get('name') or s.fingerprint[:12]} "
              f"(fingerprint {s.fingerprint[:12]}, mem_layers {s.model.get('mem_layers')}, {s.model.get('mem_dtype')})")
        print(f"files:    {s.files}\nchunks:   {s.chunks} ({s.chunks_missing_memory} not encoded yet)\n"
              f"tokens:   {s.tokens}\non disk:  {s.bytes_on_disk / 2**20:.1f} MiB")
        if s.skipped:
            print(f"skipped:  {len(s.skipped)} files")
            for path, reason in s.skipped[: args.show_skipped]:
                print(f"  {path}: {reason}")
    return 0


def _add_status(p: argparse.ArgumentParser) -> None:
    add_repository_argument(p, "indexed repository", positional_alias=True)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("--show-skipped", type=int, default=20, metavar="N", help="list at most N skipped files")


index = Command(_add_index_only, run_index,
                "Walk the repository (honouring .gitignore and .longllamaignore, never secrets), cut files into\n"
                "tree-sitter chunks, and encode each new chunk into the model's memory. The cache lives in\n"
                "REPO/.longllama/ and is keyed by content hash and model: re-runs, renames and branch switches\n"
                "cost no model time. Safe to interrupt: the next run resumes.")
watch = Command(_add_watch, run_watch, "Index, then keep the index current as files are created, edited, moved or deleted.")
status = Command(_add_status, run_status, "Show what is indexed (files, chunks, tokens, disk use, model) and what was skipped and why.")
