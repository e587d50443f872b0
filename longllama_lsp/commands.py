"""`longllama ask` and `longllama complete`: the engine from the command line.

Both run through this user's running `longllama serve --tcp` when it has --repo open (remote.py:
its server record gives the port and token; no model load), else load the model, index --repo
first (a Workspace: the indexer encodes on the engine's worker, progress bars on stderr) unless
--no-memory, then call the engine once. Answers stream to stdout as
they are generated, then the sources follow; a completion prints its text, or everything with --json.
A missing --repo directory or FILE is a usage error (exit 2) found before the model loads, and
nothing is created for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import remote
from .auth import AuthError, ServerRecord
from .cli import (
    Command,
    ProgressBars,
    add_model_arguments,
    add_repository_argument,
    marked_folder,
    repository_problem,
    shown,
    shown_text,
)
from .documents import Document
from .engine import Cancelled, Engine, EngineOptions, Source
from .workspace import Workspace, repository_status, untrained_memory_warning

logger = logging.getLogger(__name__)


def mixture_weight(value: str) -> float:
    """An argparse type: a mixture weight, 0 to 0.9 (memory.knnWeight's bounds)."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number <= 0.9:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 0.9, got {value!r}")
    return number


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`."""
    wanted = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value!r}")
        return number
    return parse


def _common(p: argparse.ArgumentParser, **repo_default: str | None) -> None:
    add_repository_argument(p, "repository to index and use as memory", **repo_default)
    p.add_argument("--no-memory", action="store_true", help="no repository or file memory: local context only")
    p.add_argument("--max-tokens", type=int_at_least(1), default=None, metavar="N",
                   help=f"most tokens to generate (default {EngineOptions.max_tokens} for complete, "
                        f"{EngineOptions.answer_max_tokens} for ask)")
    p.add_argument("--select-tokens", type=int_at_least(0), default=None, metavar="N",  # None: not given
                   help="memory tokens each query attends to: the memory blocks whose keys match it best "
                        f"(default {EngineOptions.select_tokens}; 0: all of memory, slower as the repository grows)")
    p.add_argument("--retrieve-tokens", type=int_at_least(0), default=None, metavar="N",  # None: not given
                   help="memory holds only the chunks of other files that best match the code before the cursor "
                        "(complete) or the names in the question (ask; a question naming nothing in the code reads "
                        f"all of memory), N tokens of them (default {EngineOptions.retrieve_tokens}; 0: every chunk)")
    p.add_argument("--knn-weight", type=mixture_weight, default=None, metavar="W",  # None: not given
                   help="each step mixes the model's next-token distribution with the tokens that followed the "
                        "memory positions most like the current one, with weight W (kNN-LM over memory; default "
                        f"{EngineOptions.knn_weight}; 0: off)")
    p.add_argument("--no-server", action="store_true", help="load the model here even when a running "
                   "`longllama serve --tcp` has the repository open (used by default unless --model, --device, "
                   "--dtype, --decode-dtype, --select-tokens, --retrieve-tokens or --knn-weight is given: the "
                   "server keeps its own)")
    add_model_arguments(p, decoding=True)


def usage_error(command: str, message: str) -> int:
    """Say what is wrong with the command line on stderr, argparse-style; the exit status is 2."""
    print(f"longllama {command}: error: {message}", file=sys.stderr)
    return 2


def _running_server(args: argparse.Namespace) -> ServerRecord | None:
    """This user's running server with --repo open, unless the user asked for a model or memory options
    of their own (a server's engine options are its editors' settings, shared by every session)."""
    if args.no_server or any((args.model, args.device, args.dtype, args.decode_dtype)):
        return None
    if args.select_tokens is not None or args.retrieve_tokens is not None or args.knn_weight is not None:
        logger.info("--select-tokens/--retrieve-tokens/--knn-weight given: loading the model here (a running "
                    "server keeps its own settings)")
        return None
    try:
        record = remote.find_server(Path(args.repo))
    except AuthError as exc:
        logger.warning("not looking for a running server: %s", exc)
        return None
    if record is not None:
        logger.info("using the running server (pid %d, %s:%d) that has %s open", record.pid, record.host,
                    record.port, args.repo)
    return record


def _server_settings(args: argparse.Namespace, **completion: Any) -> dict[str, Any]:
    limit = {"maxTokens": args.max_tokens} if args.max_tokens else {}
    return {"completion": {**completion, **limit, "debounceMs": 0}, "ask": limit,
            "memory": {"enabled": not args.no_memory}}


def _workspace(args: argparse.Namespace, **options: Any) -> Workspace:
    """The engine, loaded, with --repo indexed into its memory (unless --no-memory), the memory options given
    (_common's) and `options` (EngineOptions fields; None: the default)."""
    given = {"select_tokens": args.select_tokens, "retrieve_tokens": args.retrieve_tokens,
             "knn_weight": args.knn_weight, **options}
    opts = EngineOptions(memory=not args.no_memory, **{k: v for k, v in given.items() if v is not None})
    engine = Engine.load(args.model, args.device, args.dtype, options=opts, decode_dtype=args.decode_dtype)
    workspace = Workspace(engine)  # open_indexer: read-only while another process writes
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
    """Untrained memory layers make predictions worse: say so once."""
    if warning := untrained_memory_warning(model_dir, "pass --no-memory"):
        logger.warning("%s", warning)


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
    if repository_status(repo).get("files") == 0:  # an empty or wrong --repo: the answer would come from nowhere
        logger.warning("nothing in %s to remember (no file the indexer reads; `longllama status` lists what it "
                       "skipped): the model answers alone", shown(str(root.resolve())))


def format_sources(sources: list[Source]) -> str:
    """One line per source; its path and symbol come from the index: shown()."""
    return "\n".join(f"  {shown(s.location)}{'  ' + shown(s.symbol) if s.symbol else ''}  ({s.weight:.1%})"
                     for s in sources)


# -- ask ----------------------------------------------------------------------------------------------

def add_ask_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", help="the question, in quotes")
    _common(p)


def run_ask(args: argparse.Namespace) -> int:
    problem = repository_problem(args.repo) or (None if args.question.strip() else "the question is empty")
    if problem:
        return usage_error("ask", problem)
    record = _running_server(args)
    if record is not None:
        try:
            result = remote.ask(record, Path(args.repo), args.question, _server_settings(args),
                                memory=not args.no_memory)
            print(shown_text(result["answer"]))
            say_if_cut(result.get("stopReason", ""), args.max_tokens)
            sources = [Source(s["path"], s["startLine"], s["endLine"], s.get("symbol"), s["weight"])
                       for s in result["sources"]]
            if sources:
                print(f"\nSources:\n{format_sources(sources)}")
            return 0
        except remote.Unreachable as exc:
            logger.warning("the running server (pid %d) did not answer (%s): loading the model", record.pid, exc)
    workspace = _workspace(args, answer_max_tokens=args.max_tokens)
    try:
        held = [""]  # a CR that may start a CRLF split across two pieces

        def stream(text: str) -> None:  # on the engine's worker
            text, held[0] = held[0] + text, ""
            if text.endswith("\r"):
                text, held[0] = text[:-1], "\r"
            try:
                sys.stdout.write(shown_text(text))
                sys.stdout.flush()
            except BrokenPipeError as exc:  # the reader went away (`| head`): stop generating
                raise Cancelled("stdout was closed") from exc

        try:
            answer = workspace.engine.answer(args.question, on_token=stream)
        except Cancelled as exc:
            raise (exc.__cause__ or exc) from None  # cli.main ends a closed pipe quietly
        sys.stdout.write(shown_text(held[0]) + "\n")
        sys.stdout.flush()
        say_if_cut(answer.stop_reason, answer.generated_tokens)  # the limit as the engine clamped it
        if answer.sources:
            print(f"\nSources:\n{format_sources(answer.sources)}")
        logger.info("timings (ms): %s", answer.timings)
    finally:
        workspace.close()
    return 0


def say_if_cut(stop_reason: str, max_tokens: int | None) -> None:
    """An answer that ran into its token limit ends mid-sentence: say so on stderr, and how to get more
    (`max_tokens` None: the running server's own limit, not known here)."""
    if stop_reason == "max_tokens":
        limit = f"its limit of {max_tokens} tokens" if max_tokens else "the server's token limit"
        print(f"[the answer stopped at {limit}; --max-tokens N allows a longer one]", file=sys.stderr)


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
    _common(p, default=None, default_help="the nearest folder above FILE with a .git or your index "
                                          "(.longllama), else . when FILE is in it, else FILE's folder")


def repository_of(file: Path) -> Path:
    """The repository `complete` remembers when --repo is not given: the nearest folder above FILE with a
    `.git` (as git finds it) or an index of this user's (`.longllama/`), else the current directory when FILE
    is in it, else FILE's folder. The current directory it was before: a FILE of another project made
    `complete` index wherever the shell stood (a home folder: all of it) as that file's memory."""
    full, here = file.resolve(), Path.cwd()
    return marked_folder(full.parent) or (here if full.is_relative_to(here) else full.parent)


def _repository_for(args: argparse.Namespace, file: Path) -> None:
    """Fill in --repo for `complete` (repository_of) and say where it comes from; a FILE outside a --repo
    given is completed with that repository as memory, as asked, with a warning."""
    if args.repo is None:
        args.repo = str(repository_of(file))
        logger.info("repository: %s (the one that holds %s; --repo DIR to name another)", shown(args.repo),
                    shown(str(file)))
    elif not file.resolve().is_relative_to(Path(args.repo).resolve()):
        logger.warning("%s is not in --repo %s: memory holds that repository's code, not its own", shown(str(file)),
                       shown(args.repo))


def read_source(path: Path, repo: Path | None = None) -> str:
    """The text of the file to complete in; ValueError saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = ""
        if repo is not None and not path.is_absolute() and (repo / path).is_file():
            hint = f" in the current directory (FILE is relative to it, not to --repo: {repo / path}?)"
        raise ValueError(f"{path}: no such file{hint}") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a file") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None


def run_complete(args: argparse.Namespace) -> int:
    path, line, col = args.location
    try:
        text = read_source(path, None if args.repo is None else Path(args.repo))
        _repository_for(args, path)
        if problem := repository_problem(args.repo):
            raise ValueError(problem)
        offset = offset_of(text, line, col)
    except ValueError as exc:
        return usage_error("complete", str(exc))
    record = _running_server(args)
    if record is not None:
        try:
            out = remote.complete(record, Path(args.repo), path, text, line - 1, col - 1,
                                  Document("", text).line_text(line - 1), _server_settings(args, mode=args.mode),
                                  memory=not args.no_memory)
            print(json.dumps({"text": out, "server": f"{record.host}:{record.port}"}) if args.json else shown_text(out))
            say_if_empty(out, args.json)
            return 0
        except remote.Unreachable as exc:
            logger.warning("the running server (pid %d) did not answer (%s): loading the model", record.pid, exc)
    workspace = _workspace(args, max_tokens=args.max_tokens, mode=args.mode)
    try:
        done = workspace.engine.complete(text, offset, path=str(path.resolve()), mode=args.mode)
    finally:
        workspace.close()
    if args.json:
        print(json.dumps(dataclasses.asdict(done), indent=2))
    else:
        print(shown_text(done.text))
    say_if_empty(done.text, args.json)
    return 0


def say_if_empty(text: str, as_json: bool) -> None:
    """An empty completion printed a blank line and nothing else: say on stderr what it means."""
    if not text and not as_json:
        print("[no completion here: what the model wrote was already in the file after the cursor, or nothing]",
              file=sys.stderr)


ask = Command(add_ask_arguments, run_ask, description=(
    "Answer a question about the repository from the model's memory of it: the code that defines or uses "
    "the names and files the question mentions, a class's methods with it (all of the repository when it "
    "mentions none). The answer streams as it is generated, then the most-attended chunks are listed as "
    "sources."))
complete = Command(add_complete_arguments, run_complete, description=(
    "Complete the code at FILE:LINE:COL once, with the repository and the rest of the file as memory."))
