"""Repository-aware completions and Q&A on LongLLaMA (Focused Transformer) memory."""

import os

# OpenMP threads that spin while waiting steal the cores from each other and from the editor when
# the machine is busy: measured 6x slower encoding at load 5-7 without this (BENCHMARKS.md). Must be
# set before torch is imported; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# True: `import longllama_lsp.model` does not import transformers to register the model's Auto classes
# (the CLI's fast paths; see longllama_lsp.model). Per process: a child process registers as usual.
defer_model_registration = False
