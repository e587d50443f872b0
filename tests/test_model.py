"""Our LongLLaMA against the reference's golden outputs, plain LLaMA, and its own invariants.

Test Data: tests/fixtures/longllama-tiny (copied from shared/golden: outputs of the official
implementation, CStanKonrad/long_llama, on a tiny random checkpoint, fp32).
"""

from __future__ import annotations

import pytest
import torch
from conftest import GOLDEN, greedy
from helpers_models import make_tiny

from longllama_lsp.model import LongLlamaConfig, LongLlamaForCausalLM, Memory

ATOL = 1e-5


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def test_golden_a_plain_forward(golden_model, golden_cases):
    out = golden_model(golden_cases["A.input_ids"])
    assert max_diff(out.logits, golden_cases["A.logits"]) < ATOL


@torch.no_grad()
def test_golden_b_memory_windows_and_caches(golden_model, golden_cases):
    out = golden_model(golden_cases["B.input_ids"])
    assert max_diff(out.logits, golden_cases["B.logits"]) < ATOL
    cache = out.past_key_values
    assert cache.memory.num_tokens == 84 and cache.local_length == 16
    for layer in (1, 3):
        mem = cache.memory[layer]
        assert max_diff(mem.keys, golden_cases[f"B.mem.{layer}.keys"]) < ATOL
        assert max_diff(mem.values, golden_cases[f"B.mem.{layer}.values"]) < ATOL
        assert torch.equal(mem.mask, golden_cases[f"B.mem.{layer}.masks"])
        local = cache.layers[layer]
        assert max_diff(local.keys, golden_cases[f"B.local.{layer}.keys"]) < ATOL
        assert torch.equal(local.positions, golden_cases[f"B.local.{layer}.positions"][:, 0, :, 0])


@torch.no_grad()
def test_golden_c_greedy_generation_with_cache_overflow(golden_model, golden_cases):
    seqs, scores = greedy(golden_model, golden_cases["C.input_ids"], 40)
    assert torch.equal(seqs, golden_cases["C.generated"])
    assert max_diff(scores, golden_cases["C.scores"]) < ATOL


@torch.no_grad()
def test_golden_d_attention_grouping_is_pure_tiling(golden_cases):
    model = LongLlamaForCausalLM.from_pretrained(GOLDEN, mem_attention_grouping=(1, 4)).eval()
    assert model.config.mem_attention_grouping == (1, 4)
    assert max_diff(model(golden_cases["B.input_ids"]).logits, golden_cases["D.logits"]) < ATOL


@torch.no_grad()
def test_golden_e_left_padding(golden_model, golden_cases):
    out = golden_model(golden_cases["E.input_ids"], attention_mask=golden_cases["E.attention_mask"])
    assert max_diff(out.logits, golden_cases["E.logits"]) < ATOL


@pytest.mark.parametrize("tie", [True, False])
@torch.no_grad()
def test_no_memory_layers_equals_transformers_llama(tie):
    """mem_layers=[] within one window is plain LLaMA, including GQA and tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = make_tiny(seed=3, mem_layers=[], tie_word_embeddings=tie, max_position_embeddings=64, rope_theta=5e5)
    cfg = LlamaConfig(**{k: v for k, v in ours.config.to_dict().items() if k in LlamaConfig.__dataclass_fields__})
    theirs = LlamaForCausalLM(cfg).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(0, 99, (2, 40))
    assert max_diff(ours(ids, last_context_length=64).logits, theirs(ids).logits) < ATOL


@torch.no_grad()
def test_cached_generation_equals_recompute():
    """Each greedy step with the local cache equals a full recompute from scratch (within one window)."""
    model = make_tiny(seed=1, max_position_embeddings=64, last_context_length=48)
    prompt = torch.randint(0, 99, (1, 30))
    seqs, scores = greedy(model, prompt, 12)
    for step in range(12):
        prefix = seqs[:, : 30 + step]
        assert max_diff(model(prefix, use_cache=False).logits[:, -1], scores[:, step]) < 1e-4


@torch.no_grad()
def test_memory_from_chunks_in_any_order_equals_in_order():
    model = make_tiny(seed=2)
    chunks = [torch.randint(0, 99, (1, n)) for n in (20, 32, 11, 27)]
    memories = [model.encode_memory(c) for c in chunks]
    query = torch.randint(0, 99, (1, 10))
    in_order = model(query, memory=Memory.concat(memories)).logits
    shuffled = model(query, memory=Memory.concat([memories[i] for i in (2, 0, 3, 1)])).logits
    assert max_diff(in_order, shuffled) < 1e-5
    assert max_diff(in_order, model(query).logits) > 1e-3  # memory does change the output


@torch.no_grad()
def test_encode_memory_equals_memory_built_from_long_input(golden_model, golden_cases):
    """Independent encoding of the first window == the reference's first-window memory; sequential
    encoding of the later windows == the reference's memory of them."""
    ids = golden_cases["B.input_ids"]
    full = golden_model(ids).past_key_values.memory
    first = golden_model.encode_memory(ids[:, :32])
    second = golden_model.encode_memory(ids[:, 32:64], memory=first)
    third = golden_model.encode_memory(ids[:, 64:84], memory=Memory.concat([first, second]))
    rebuilt = Memory.concat([first, second, third])
    for layer in full:
        assert max_diff(rebuilt[layer].keys, full[layer].keys) < ATOL
        assert max_diff(rebuilt[layer].values, full[layer].values) < ATOL


@torch.no_grad()
def test_topk_with_k_at_least_memory_equals_dense():
    dense = make_tiny(seed=4)
    memory = Memory.concat([dense.encode_memory(torch.randint(0, 99, (1, 30))) for _ in range(3)])
    query = torch.randint(0, 99, (1, 12))
    expected = dense(query, memory=memory).logits
    dense.config.mem_topk = memory.num_tokens
    assert max_diff(dense(query, memory=memory).logits, expected) < 1e-5
    dense.config.mem_topk = 4
    assert max_diff(dense(query, memory=memory).logits, expected) > 1e-4  # a real cut changes things
    dense.config.mem_topk = None


@torch.no_grad()
def test_blocked_memory_attention_equals_single_pass(monkeypatch):
    from longllama_lsp.model import attention

    model = make_tiny(seed=5)
    memory = Memory.concat([model.encode_memory(torch.randint(0, 99, (1, 30))) for _ in range(4)])
    query = torch.randint(0, 99, (1, 12))
    out = model(query, memory=memory, output_memory_attention=True)
    monkeypatch.setattr(attention, "MEM_BLOCK", 7)  # force the streaming path over 17 blocks
    blocked = model(query, memory=memory, output_memory_attention=True)
    assert max_diff(out.logits, blocked.logits) < 1e-5
    w, wb = out.memory_attention[1], blocked.memory_attention[1]
    assert w.shape == (1, 120) and max_diff(w, wb) < 1e-5


@torch.no_grad()
def test_torch_attention_matches_manual(golden_cases):
    manual = LongLlamaForCausalLM.from_pretrained(GOLDEN).eval()
    sdpa = LongLlamaForCausalLM.from_pretrained(GOLDEN, torch_attention=True).eval()
    ids = golden_cases["B.input_ids"]
    assert max_diff(manual(ids).logits, sdpa(ids).logits) < 1e-4


def test_crossbatch_gradients_reach_memory_layer_values():
    from longllama_lsp.model.crossbatch import CrossBatch

    model = make_tiny(seed=6).train()
    ids = torch.randint(0, 99, (4, 16))
    out = model(ids, labels=ids, crossbatch=CrossBatch(range=3, pack=4, stepping=True))
    out.loss.backward()
    assert model.model.layers[1].self_attn.v_proj.weight.grad.abs().sum() > 0


def test_unknown_rope_type_is_refused():
    """Every rope_type transformers computes is accepted (tests/test_families.py); others fail at once."""
    from huggingface_hub.errors import StrictDataclassClassValidationError

    with pytest.raises(StrictDataclassClassValidationError, match="rope_type 'bogus' is not supported"):
        LongLlamaConfig(rope_scaling={"type": "bogus", "factor": 2.0})


def test_config_has_every_published_key():
    import json

    published = json.loads((GOLDEN / "config.json").read_text())
    cfg = LongLlamaConfig.from_pretrained(GOLDEN)
    for key in ("mem_layers", "mem_dtype", "mem_positionals", "mem_attention_grouping", "last_context_length",
                "torch_attention", "gradient_checkpoint_every_ith", "max_position_embeddings"):
        assert getattr(cfg, key) == published[key] or list(getattr(cfg, key) or []) == published[key]
    assert cfg.rope_theta == 10000.0


@pytest.mark.parametrize("reuse_storage", [False, True])
@torch.no_grad()
def test_crop_then_prefill_equals_fresh_prefill(reuse_storage):
    """Prefix reuse: crop the local cache to a common prefix, feed the changed tokens: same logits.
    reuse_storage (the engine's own cache): the changed tokens go into the same storage, no copy."""
    model = make_tiny(seed=7, max_position_embeddings=64, last_context_length=64)
    a = torch.randint(0, 99, (1, 40))
    b = torch.cat([a[:, :31], torch.randint(0, 99, (1, 6))], dim=1)
    cache = model(a, use_cache=True).past_key_values
    arenas = [c.arena for c in cache.layers]
    cache.crop(31, reuse_storage=reuse_storage)
    out = model(b[:, 31:], past_key_values=cache, use_cache=True)
    fresh = model(b, use_cache=True).logits[:, 31:]
    assert max_diff(out.logits, fresh) < 1e-5
    assert ([c.arena for c in out.past_key_values.layers] == arenas) is reuse_storage


def _step(model, cache, token: int):
    out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
    return out.logits[:, -1], out.past_key_values


@pytest.mark.parametrize("mem_positionals", [True, False])
@torch.inference_mode()
def test_in_place_cache_growth_equals_recompute(monkeypatch, mem_positionals):
    """Decoding appends into the cache's arena in place; past its capacity (a 3-token headroom here)
    it moves to a bigger one. Every step equals a full recompute, with and without memory RoPE."""
    from longllama_lsp.model import modeling_longllama

    monkeypatch.setattr(modeling_longllama._Arena, "HEADROOM", 3)
    model = make_tiny(seed=8, max_position_embeddings=64, last_context_length=64, mem_positionals=mem_positionals)
    seq = torch.randint(0, 99, (1, 30))
    cache = model(seq[:, :20], use_cache=True).past_key_values
    first = [c.arena for c in cache.layers]  # held: a freed arena's id() may be reused by a new one
    for i in range(20, 30):
        logits, cache = _step(model, cache, int(seq[0, i]))
        assert max_diff(logits, model(seq[:, : i + 1], use_cache=False).logits[:, -1]) < 1e-5
    assert all(c.arena is not None for c in cache.layers)
    assert not any(c.arena is a for c in cache.layers for a in first)  # grew past the first arenas


@torch.inference_mode()
def test_two_continuations_of_one_cache_do_not_overwrite_each_other():
    """A cache continued twice (the second continuation copies) and a cropped cache both stay right."""
    model = make_tiny(seed=9, max_position_embeddings=64, last_context_length=64)
    prompt = torch.randint(0, 99, (1, 20))
    cache = model(prompt, use_cache=True).past_key_values
    _, after_a = _step(model, cache, 5)
    _, after_b = _step(model, cache, 7)  # same starting cache: must not write over token 5
    logits_a, _ = _step(model, after_a, 11)
    logits_b, _ = _step(model, after_b, 11)
    recompute = lambda *toks: model(torch.cat([prompt, torch.tensor([list(toks)])], dim=1)).logits[:, -1]  # noqa: E731
    assert max_diff(logits_a, recompute(5, 11)) < 1e-5
    assert max_diff(logits_b, recompute(7, 11)) < 1e-5
    after_a.crop(18)
    logits_c, _ = _step(model, after_a, 3)
    assert max_diff(logits_c, model(torch.cat([prompt[:, :18], torch.tensor([[3]])], dim=1)).logits[:, -1]) < 1e-5
    assert max_diff(_step(model, after_b, 13)[0], recompute(7, 13)) < 1e-5  # still intact


def test_cache_with_autograd_is_not_written_in_place():
    """With autograd on, the local cache is built by concatenation (no arena): gradients stay right."""
    model = make_tiny(seed=10, max_position_embeddings=64, last_context_length=64)
    cache = model(torch.randint(0, 99, (1, 12)), use_cache=True).past_key_values
    assert all(c.arena is None for c in cache.layers)
    out = model(torch.tensor([[4]]), past_key_values=cache, use_cache=True)
    out.logits.sum().backward()
    assert model.model.layers[0].self_attn.k_proj.weight.grad is not None


def test_decode_weights_serve_small_steps_only():
    """bfloat16 copies of the linear weights answer inputs of <= 16 rows; larger inputs, autograd and
    the saved state are float32's, untouched (model/decode_weights.py)."""
    from torch import nn

    from longllama_lsp.model.decode_weights import SMALL_ROWS, DecodeLinear, add_decode_weights, decode_dtype

    plain = make_tiny(seed=11, max_position_embeddings=64, last_context_length=64)
    fast = make_tiny(seed=11, max_position_embeddings=64, last_context_length=64)
    names = set(fast.state_dict())
    linears = [m for m in fast.modules() if type(m) is nn.Linear]
    added = add_decode_weights(fast)
    assert added == sum(m.weight.numel() * 2 for m in linears) and decode_dtype(fast) == torch.bfloat16
    assert all(type(m) is DecodeLinear for m in linears) and set(fast.state_dict()) == names
    small, large = torch.randint(0, 99, (1, SMALL_ROWS)), torch.randint(0, 99, (1, SMALL_ROWS + 1))
    with torch.inference_mode():
        assert torch.equal(fast(large).logits, plain(large).logits)
        a, b = fast(small).logits, plain(small).logits
        assert 0 < max_diff(a, b) < 0.05 * b.abs().max()  # bfloat16 rounding, not another function
    assert torch.equal(fast(small).logits, plain(small).logits)  # autograd on: float32 weights

