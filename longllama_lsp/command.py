"""A CLI subcommand as plain data: how it adds its arguments and how it runs."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")  # compute / on-disk dtypes the CLI accepts


@dataclass(frozen=True)
class Command:
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


def add_model_arguments(p: argparse.ArgumentParser, *, decoding: bool = False) -> None:
    """--model / --device / --dtype, shared by every command that loads the model (+ --decode-dtype for
    the commands that generate)."""
    p.add_argument("--model", metavar="PATH", help="LongLLaMA checkpoint dir, LLaMA dir or GGUF file "
                   "(default: $LONGLLAMA_MODEL, else the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present, else cpu)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="compute dtype (default: float32 on cpu, bfloat16 on cuda)")
    if decoding:
        p.add_argument("--decode-dtype", default=None, choices=DTYPES,
                       help="weights for steps of a few tokens (default: bfloat16 copies when the model runs "
                       "in float32 on a CPU, ~1.5x faster decoding; the --dtype value: no copies)")
