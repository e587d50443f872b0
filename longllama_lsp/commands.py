"""`longllama ask` and `longllama complete`: the engine from the command line.

Both load the model, index --repo first (a Workspace: the indexer encodes on the engine's worker,
progress bars on stderr) unless --no-memory, then call the engine once. Answers stream to stdout as
they are generated, then the sources follow; a completion prints its text, or everything with --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .cli import Command, ProgressBars, add_model_arguments, add_repository_argument
from .documents import Document
from .engine import Engine, EngineOptions, Source
from .workspace import Workspace, memory_untrained

logger = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    add_repository_argument(p, "repository to index and use as memory")
    p.add_argument("--no-memory", action="store_true", help="no repository or file memory: local context only")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="most tokens to generate")
    add_model_arguments(p, decoding=True)


def _workspace(args: argparse.Namespace, **options: Any) -> Workspace:
    """The engine, loaded, with --repo indexed into its memory (unless --no-memory)."""
    opts = EngineOptions(memory=not args.no_memory, **{k: v for k, v in options.items() if v is not None})
    engine = Engine.load(args.model, args.device, args.dtype, options=opts, decode_dtype=args.decode_dtype)
    workspace = Workspace(engine)
    try:
        engine.wait_ready()
        if not args.no_memory:
            warn_if_memory_untrained(engine.model_dir)
            _index(workspace, Path(args.repo))
    except BaseException:
        workspace.close()
        raise
    return workspace


def warn_if_memory_untrained(model_dir: Path | None) -> None:
    """Untrained memory layers make predictions worse: say so once (workspace.memory_untrained)."""
    if memory_untrained(model_dir):
        logger.warning("the memory layers of %s are not FoT-trained: repository memory may make answers "
                       "worse; pass --no-memory, or train them (longllama finetune)", model_dir)


def _index(workspace: Workspace, root: Path) -> None:
    """Index `root` (progress bars on stderr); memory is the file itself only if the indexer cannot run."""
    try:
        repo = workspace.open(root, user="cli")
    except ImportError as exc:
        logger.warning("indexing unavailable (%s): memory is the file itself only", exc)
        return
    bars = ProgressBars(enabled=sys.stderr.isatty())
    try:
        workspace.index(repo, progress=bars)
    finally:
        bars.close()


def format_sources(sources: list[Source]) -> str:
    return "\n".join(f"  {s.location}{'  ' + s.symbol if s.symbol else ''}  ({s.weight:.1%})" for s in sources)


# -- ask ----------------------------------------------------------------------------------------------

def add_ask_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", help="the question, in quotes")
    _common(p)


def run_ask(args: argparse.Namespace) -> int:
    workspace = _workspace(args, answer_max_tokens=args.max_tokens)
    try:
        def stream(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        answer = workspace.engine.answer(args.question, on_token=stream)
        sys.stdout.write("\n")
        if answer.sources:
            print(f"\nSources:\n{format_sources(answer.sources)}")
        logger.info("timings (ms): %s", answer.timings)
    finally:
        workspace.close()
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
    workspace = _workspace(args, max_tokens=args.max_tokens, mode=args.mode)
    try:
        done = workspace.engine.complete(text, offset, path=str(path.resolve()), mode=args.mode)
    finally:
        workspace.close()
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
