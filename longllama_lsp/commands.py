"""`longllama ask` and `longllama complete`: the engine from the command line.

Both load the model, index --root first (indexer.pipeline, progress bar on stderr) unless
--no-memory, then call the engine once. Answers stream to stdout as they are generated, then the
sources follow; a completion prints its text, or everything with --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .command import Command, add_model_arguments
from .documents import Document
from .engine import Engine, EngineOptions, Source

logger = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=".", metavar="DIR", help="repository to index and use as memory (default: .)")
    p.add_argument("--no-memory", action="store_true", help="no repository or file memory: local context only")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="most tokens to generate")
    add_model_arguments(p, decoding=True)


def _engine(args: argparse.Namespace, **options: Any) -> Engine:
    opts = EngineOptions(memory=not args.no_memory, **{k: v for k, v in options.items() if v is not None})
    engine = Engine.load(args.model, args.device, args.dtype, options=opts, decode_dtype=args.decode_dtype)
    engine.wait_ready()
    if not args.no_memory:
        warn_if_memory_untrained(engine.model_dir)
        indexer = _index(Path(args.root), engine)
        if indexer is not None:
            engine.repositories.append(indexer)
    return engine


def warn_if_memory_untrained(model_dir: Path | None) -> None:
    """Untrained memory layers make predictions worse (BENCHMARKS.md, issue 6): say so once."""
    from .model.loading import memory_training

    if model_dir is not None and memory_training(model_dir) is None:
        logger.warning("the memory layers of %s are not FoT-trained: repository memory may make answers "
                       "worse; pass --no-memory, or train them (longllama finetune)", model_dir)


def _index(root: Path, engine: Engine) -> Any | None:
    """Index `root` (progress bars on stderr); None if the indexer cannot run here."""
    try:
        from indexer.commands import ProgressBars

        from .server import default_indexer_factory
        from .settings import Settings

        indexer = default_indexer_factory(root.resolve(), engine, Settings())
    except ImportError as exc:
        logger.warning("indexing unavailable (%s): memory is the file itself only", exc)
        return None
    bars = ProgressBars(enabled=sys.stderr.isatty())
    try:
        summary = indexer.index(progress=bars)
    finally:
        bars.close()
    logger.info("indexed %s: %s", root, summary.line() if hasattr(summary, "line") else summary)
    return indexer


def _close(engine: Engine) -> None:
    for repo in engine.repositories:
        (getattr(repo, "close", None) or repo.stop)()
    engine.close()


def format_sources(sources: list[Source]) -> str:
    return "\n".join(f"  {s.location}{'  ' + s.symbol if s.symbol else ''}  ({s.weight:.1%})" for s in sources)


# -- ask ----------------------------------------------------------------------------------------------

def add_ask_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", help="the question, in quotes")
    _common(p)


def run_ask(args: argparse.Namespace) -> int:
    engine = _engine(args, answer_max_tokens=args.max_tokens)
    try:
        def stream(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        answer = engine.answer(args.question, on_token=stream)
        sys.stdout.write("\n")
        if answer.sources:
            print(f"\nSources:\n{format_sources(answer.sources)}")
        logger.info("timings (ms): %s", answer.timings)
    finally:
        _close(engine)
    return 0


# -- complete ---------------------------------------------------------------------------------------------

def parse_location(location: str) -> tuple[Path, int, int]:
    """FILE:LINE:COL (1-based line and column, the column in characters)."""
    try:
        file, line, col = location.rsplit(":", 2)
        return Path(file), int(line), int(col)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FILE:LINE:COL, got {location!r}") from None


def offset_of(text: str, line: int, col: int) -> int:
    """Code-point offset of a 1-based line and column (lines broken as LSP does: \n, \r\n, \r)."""
    doc = Document("", text)
    if not 1 <= line <= len(doc.line_starts):
        raise ValueError(f"line {line} is outside the file (1..{len(doc.line_starts)})")
    content = doc.line_text(line - 1)
    if not 1 <= col <= len(content) + 1:
        raise ValueError(f"column {col} is outside line {line} (1..{len(content) + 1})")
    return doc.line_starts[line - 1] + col - 1


def add_complete_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("location", type=parse_location, metavar="FILE:LINE:COL",
                   help="where to complete: 1-based line and column (characters)")
    p.add_argument("--mode", choices=["line", "block"], default="line", help="stop at the end of the line or block")
    p.add_argument("--json", action="store_true", help="print the Completion (text, sources, timings) as JSON")
    _common(p)


def run_complete(args: argparse.Namespace) -> int:
    path, line, col = args.location
    text = path.read_text(encoding="utf-8")
    try:
        offset = offset_of(text, line, col)
    except ValueError as exc:
        print(f"longllama complete: error: {exc}", file=sys.stderr)
        return 2
    engine = _engine(args, max_tokens=args.max_tokens, mode=args.mode)
    try:
        done = engine.complete(text, offset, path=str(path.resolve()), mode=args.mode)
    finally:
        _close(engine)
    if args.json:
        print(json.dumps(dataclasses.asdict(done), indent=2))
    else:
        print(done.text)
    return 0


ask = Command(add_ask_arguments, run_ask, description=(
    "Answer a question from the whole repository held in the model's memory. The answer streams as it "
    "is generated, then the most-attended chunks are listed as sources."))
complete = Command(add_complete_arguments, run_complete, description=(
    "Complete the code at FILE:LINE:COL once, with the repository and the rest of the file as memory."))
