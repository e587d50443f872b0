"""Block-sparse memory attention (issue 15): blocks with min/max summaries, top blocks per query tile.

Tiny random models (tests/helpers_models.make_tiny: GQA 4 query / 2 key-value heads). The dense path is
the reference (tests/test_model.py golden tests); these check that sparse selection reduces to it
when it keeps every live block, that it finds a block that matters, that the host tier reads the
same numbers as the device tier, and that the reported sources are the blocks actually attended.
"""

from __future__ import annotations

import pytest
import torch
from helpers_models import make_tiny, smol_tokenizer, smol_tokenizer_dir, tiny_model_dir  # noqa: F401

from longllama_lsp.model import Memory
from longllama_lsp.model import memory as memory_module
from longllama_lsp.model.attention import Sparse, attend
from longllama_lsp.model.memory import MASK_MIN, MemCache

BLOCK = 16


def decode(model, prompt, memory, steps):
    """Greedy decoding with memory: (sequences, per-step logits (B, steps, V))."""
    out = model.generate(prompt, memory=memory, max_new_tokens=steps, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, dim=1)


def _memory_with_padding(model, chunks: int = 3, pads: int = 2, seed: int = 0) -> tuple[Memory, int]:
    """`chunks` encoded 32-token chunks interleaved with `pads` masked 32-slot stretches (as the bank's
    free slots are): (memory, live tokens). Padding keys are large so their bound would win if asked."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for i in range(chunks):
        parts.append(model.encode_memory(torch.randint(0, 99, (1, 32), generator=g)))
        if i < pads:
            pad = {}
            for layer, c in parts[-1].items():
                noise = 50 * torch.randn(c.keys.shape, generator=g).to(c.keys.dtype)
                pad[layer] = MemCache(noise, noise.clone(), torch.full_like(c.mask, MASK_MIN))
            parts.append(Memory(pad))
    return Memory.concat(parts), 32 * chunks


@torch.no_grad()
@pytest.mark.parametrize("positionals", [True, False])
def test_sparse_keeping_every_live_block_equals_dense_prefill_and_decode(positionals):
    model = make_tiny(seed=11, mem_positionals=positionals)
    memory, live = _memory_with_padding(model)
    prompt = torch.randint(0, 99, (1, 12))
    dense_seq, dense_scores = decode(model, prompt, memory, 6)
    dense_logits = model(prompt, memory=memory).logits
    model.config.mem_block_size, model.config.mem_budget = BLOCK, live  # < M: the sparse path runs
    assert memory.num_tokens > live
    sparse_logits = model(prompt, memory=memory).logits
    sparse_seq, sparse_scores = decode(model, prompt, memory, 6)
    assert (sparse_logits - dense_logits).abs().max() < 1e-5
    assert torch.equal(sparse_seq, dense_seq)
    assert (sparse_scores - dense_scores).abs().max() < 1e-5  # every decode step
    model.config.mem_budget = memory.num_tokens  # budget >= memory: the dense path itself
    assert torch.equal(model(prompt, memory=memory).logits, dense_logits)


@torch.no_grad()
def test_sparse_with_topk_keeps_each_querys_top_keys_of_the_selected_blocks():
    """mem_topk applies within the selection: keeping every live block, sparse + top-k equals the dense
    path's exact top-k; and the cut is real."""
    model = make_tiny(seed=11)
    memory, live = _memory_with_padding(model)
    prompt = torch.randint(0, 99, (1, 12))
    model.config.mem_topk = 5
    exact = model(prompt, memory=memory).logits  # dense top-k over every memory key
    model.config.mem_block_size, model.config.mem_budget = BLOCK, live
    sparse = model(prompt, memory=memory).logits
    model.config.mem_topk = None
    assert (sparse - exact).abs().max() < 1e-5
    assert (model(prompt, memory=memory).logits - exact).abs().max() > 1e-4


@torch.no_grad()
def test_a_real_cut_changes_the_output():
    """The equality above is not vacuous: with half the live blocks the logits move."""
    model = make_tiny(seed=11)
    memory, live = _memory_with_padding(model)
    prompt = torch.randint(0, 99, (1, 12))
    dense = model(prompt, memory=memory).logits
    model.config.mem_block_size, model.config.mem_budget = BLOCK, live // 2
    assert (model(prompt, memory=memory).logits - dense).abs().max() > 1e-4


def _planted(seed: int, planted_block: int = 37):
    """Random queries and memory (B=1, Hkv=2, G=2, M=1024, D=16) with one block whose keys point
    along each key/value head's mean query: the block that dominates q.k."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 3, 16, generator=g)  # (B, H, T, D)
    k, v = torch.randn(1, 2, 3, 16, generator=g), torch.randn(1, 2, 3, 16, generator=g)
    mask = torch.zeros(1, 1, 3, 3).masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), -1e9)
    keys = torch.randn(1, 2, 1024, 16, generator=g)
    direction = q.view(1, 2, 2, 3, 16).mean(dim=(2, 3))  # (B, Hkv, D)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    span = slice(planted_block * BLOCK, (planted_block + 1) * BLOCK)
    keys[:, :, span] = 20 * direction[:, :, None] + 0.1 * torch.randn(1, 2, BLOCK, 16, generator=g)
    memory = MemCache(keys, torch.randn(1, 2, 1024, 16, generator=g), torch.zeros(1, 1, 1024, 1))
    return q, k, v, mask, memory, span


@pytest.mark.parametrize("seed", range(8))
def test_a_planted_block_is_always_selected(seed):
    q, k, v, mask, memory, span = _planted(seed)
    _, weights = attend(q, k, v, mask, memory, want_memory_weights=True, sparse=Sparse(BLOCK, 4 * BLOCK))
    attended = weights[0] > 0
    assert attended[span].all()
    assert int(attended.sum()) <= 2 * 4 * BLOCK  # at most 4 blocks per key/value head
    # and the planted block draws more attention than any other block
    per_block = weights[0].view(-1, BLOCK).sum(dim=-1)
    assert int(per_block.argmax()) == span.start // BLOCK


def test_each_batch_row_is_masked_by_its_own_memory_mask():
    """A batch of two whose memories hide opposite halves: sparse attention keeping every live block
    equals dense row by row (one row's mask must not reach the other row, or a key/value head)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 16, generator=g)
    k, v = torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 3, 16, generator=g)
    mask = torch.zeros(2, 1, 3, 3).masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), -1e9)
    hidden = torch.zeros(2, 1, 1024, 1)
    hidden[0, :, :512], hidden[1, :, 512:] = MASK_MIN, MASK_MIN
    keys, values = torch.randn(2, 2, 1024, 16, generator=g), torch.randn(2, 2, 1024, 16, generator=g)
    dense = attend(q, k, v, mask, MemCache(keys, values, hidden), want_memory_weights=True)
    sparse = attend(q, k, v, mask, MemCache(keys, values, hidden), want_memory_weights=True,
                    sparse=Sparse(BLOCK, 512))  # 512 = the live slots of each row
    assert (sparse[0] - dense[0]).abs().max() < 1e-5
    assert (sparse[1] - dense[1]).abs().max() < 1e-6


@torch.no_grad()
def test_sources_are_the_selected_blocks():
    """output_memory_attention reports mass only on whole selected blocks, at most budget/block per
    key/value head, and equals the attention recomputed densely over exactly those slots (one key/value
    head, so every query head shares one selection)."""
    model = make_tiny(seed=3, num_key_value_heads=1)
    g = torch.Generator().manual_seed(3)
    memory = Memory.concat([model.encode_memory(torch.randint(0, 99, (1, 32), generator=g)) for _ in range(8)])
    prompt = torch.randint(0, 99, (1, 10))
    model.config.mem_block_size, model.config.mem_budget = BLOCK, 3 * BLOCK
    out = model(prompt, memory=memory, output_memory_attention=True)
    (layer, weights), = out.memory_attention.items()
    hit = (weights[0] > 0).view(-1, BLOCK)
    blocks = hit.any(dim=-1)
    assert hit[blocks].all()  # whole blocks
    assert int(blocks.sum()) == 3
    # Dense attention restricted (by the mask) to the attended blocks gives the same logits.
    keep = blocks.repeat_interleave(BLOCK)
    restricted = Memory({i: MemCache(c.keys, c.values, c.mask.masked_fill(~keep[None, None, :, None], MASK_MIN))
                         for i, c in memory.items()})
    model.config.mem_budget = None
    assert (model(prompt, memory=restricted).logits - out.logits).abs().max() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_host_tier_gives_the_same_logits_as_the_device_tier(tmp_path, dtype):
    model = make_tiny(seed=5, mem_dtype=dtype)
    g = torch.Generator().manual_seed(5)
    memory = Memory.concat([model.encode_memory(torch.randint(0, 99, (1, 40), generator=g)) for _ in range(6)])
    host = Memory({i: c.on_host(str(tmp_path)) for i, c in memory.items()})
    assert all(c.keys.untyped_storage().data_ptr() != memory[i].keys.untyped_storage().data_ptr()
               for i, c in host.items())
    assert list(tmp_path.iterdir())  # memory-mapped files back the host tier
    prompt = torch.randint(0, 99, (1, 9))
    model.config.mem_block_size, model.config.mem_budget = BLOCK, 4 * BLOCK
    device_out = decode(model, prompt, memory, 4)
    host_out = decode(model, prompt, host, 4)
    assert torch.equal(device_out[0], host_out[0])
    assert torch.equal(device_out[1], host_out[1])


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", [dict(torch_attention=True), dict(mem_topk=16), {}], ids=["sdpa", "topk", "dense"])
def test_host_tier_within_the_budget_gives_the_device_tier_logits(tmp_path, device, path):
    """Memory within the budget is attended densely (sdpa, top-k or the manual path), all of it read
    from the host tier; on a GPU the host memory meets CUDA queries (see the meta-device test below
    for a machine without one)."""
    model = make_tiny(seed=8, mem_dtype="bfloat16", **path).to(device)
    g = torch.Generator().manual_seed(8)
    memory = Memory.concat([model.encode_memory(torch.randint(0, 99, (1, 40), generator=g).to(device))
                            for _ in range(3)])
    host = Memory({i: c.on_host(str(tmp_path)) for i, c in memory.items()})
    assert all(c.keys.device.type == "cpu" for c in host.values())
    prompt = torch.randint(0, 99, (1, 9), generator=g).to(device)
    model.config.mem_block_size, model.config.mem_budget = BLOCK, memory.num_tokens  # within: not sparse
    assert torch.equal(model(prompt, memory=host).logits, model(prompt, memory=memory).logits)


@pytest.mark.parametrize("path", ["sdpa", "topk", "dense"])
def test_memory_on_another_device_than_the_queries_is_moved_to_them(path):
    """Host memory with queries elsewhere (the meta device stands in for a GPU on a CPU-only machine):
    every path that reads the whole memory moves it to the queries' device, none fails at cat/gather."""
    from longllama_lsp.model.attention import sdpa_attend

    q, k, v, mask, memory, _ = _planted(0)
    q, k, v, mask = (x.to("meta") for x in (q, k, v, mask))
    if path == "sdpa":
        out = sdpa_attend(q, k, v, mask, memory)
    else:
        out, _ = attend(q, k, v, mask, memory, topk=8 if path == "topk" else None)
    assert out.device.type == "meta" and out.shape == q.shape


@torch.no_grad()
def test_summaries_are_built_once_per_memory(monkeypatch):
    """Decoding many steps over one memory builds its block summaries once per layer, not per step."""
    model = make_tiny(seed=6)
    memory = Memory.concat([model.encode_memory(torch.randint(0, 99, (1, 32))) for _ in range(6)])
    built = []
    real = memory_module.BlockSummary.of.__func__

    def counting(cls, keys, size, device=None):
        built.append(size)
        return real(cls, keys, size, device)

    monkeypatch.setattr(memory_module.BlockSummary, "of", classmethod(counting))
    model.config.mem_block_size, model.config.mem_budget = BLOCK, 2 * BLOCK
    model.generate(torch.randint(0, 99, (1, 8)), memory=memory, max_new_tokens=5)
    model.generate(torch.randint(0, 99, (1, 8)), memory=memory, max_new_tokens=5)
    assert built == [BLOCK] * len(model.config.mem_layers)


def test_visible_groups_are_computed_once_per_memory_with_a_short_last_group():
    """Two-level selection asks every layer and step for the groups holding a visible block: computed
    once per memory (and mask), a group visible when any of its blocks is, the short last group too."""
    m, size, group = 7 * 4, 4, 3  # 7 blocks: groups of 3, 3 and 1
    mask = torch.full((1, 1, m, 1), MASK_MIN)
    mask[0, 0, 13] = 0.0  # block 3: group 1
    mask[0, 0, 25] = 0.0  # block 6: the short last group
    keys = torch.randn(1, 2, m, 8)
    memory = MemCache(keys, keys.clone(), mask)
    groups = memory.visible_groups(size, group)
    assert groups.tolist() == [[False, True, True]]
    assert memory.visible_groups(size, group) is groups
    assert memory.visible_groups(size, 2).tolist() == [[False, True, False, True]]


def test_block_aligned_concat_keeps_summaries():
    keys = torch.randn(1, 2, 64, 8)
    a = MemCache(keys[:, :, :32], keys[:, :, :32].clone(), torch.zeros(1, 1, 32, 1))
    b = MemCache(keys[:, :, 32:], keys[:, :, 32:].clone(), torch.zeros(1, 1, 32, 1))
    a.blocks(BLOCK), b.blocks(BLOCK)
    joined = MemCache.concat([a, b])
    assert joined.summary is not None
    whole = memory_module.BlockSummary.of(keys, BLOCK)
    assert torch.equal(joined.summary.kmin, whole.kmin) and torch.equal(joined.summary.kmax, whole.kmax)
    fresh = MemCache(keys[:, :, 32:], keys[:, :, 32:].clone(), torch.zeros(1, 1, 32, 1))  # no summary yet
    joined = MemCache.concat([a, fresh])  # the missing part is summarised, the known one reused
    assert torch.equal(joined.summary.kmin, whole.kmin) and torch.equal(joined.summary.kmax, whole.kmax)
    c = MemCache(keys[:, :, :20], keys[:, :, :20].clone(), torch.zeros(1, 1, 20, 1))
    c.blocks(BLOCK)
    assert MemCache.concat([c, b]).summary is None  # misaligned: rebuilt on first use instead


# -- two-level selection (groups of blocks first; forced on at small sizes with coarse_from) ------------------

TWO_LEVEL = {"group": 4, "coarse_from": 8}  # 64 blocks of 16 -> 16 groups of 4 blocks


@pytest.mark.parametrize("seed", range(8))
def test_two_level_selection_keeps_a_planted_block(seed):
    """A block whose keys dominate q.k wins its group first, then its own place: it draws the most mass."""
    q, k, v, mask, memory, span = _planted(seed)
    _, weights = attend(q, k, v, mask, memory, want_memory_weights=True,
                        sparse=Sparse(BLOCK, 4 * BLOCK, **TWO_LEVEL))
    attended = weights[0] > 0
    assert attended[span].all()
    assert int(attended.sum()) <= 2 * 4 * BLOCK
    assert int(weights[0].view(-1, BLOCK).sum(dim=-1).argmax()) == span.start // BLOCK


def test_two_level_keeping_every_live_block_equals_dense_row_by_row():
    """Two rows hiding opposite halves, the last group short (62 blocks, groups of 4): with a budget of
    every live block the two-level path attends to exactly them (hidden and padded blocks never)."""
    g = torch.Generator().manual_seed(1)
    m = 62 * BLOCK
    q = torch.randn(2, 4, 3, 16, generator=g)
    k, v = torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 3, 16, generator=g)
    mask = torch.zeros(2, 1, 3, 3).masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), -1e9)
    hidden = torch.zeros(2, 1, m, 1)
    hidden[0, :, :m // 2], hidden[1, :, m // 2:] = MASK_MIN, MASK_MIN
    keys, values = torch.randn(2, 2, m, 16, generator=g), torch.randn(2, 2, m, 16, generator=g)
    dense = attend(q, k, v, mask, MemCache(keys, values, hidden), want_memory_weights=True)
    sparse = attend(q, k, v, mask, MemCache(keys, values, hidden), want_memory_weights=True,
                    sparse=Sparse(BLOCK, m // 2, **TWO_LEVEL))
    assert (sparse[0] - dense[0]).abs().max() < 1e-5
    assert (sparse[1] - dense[1]).abs().max() < 1e-5


def test_two_level_scores_the_groups_and_only_the_chosen_groups_blocks(monkeypatch):
    """The point of the coarse level: a step scores NG group summaries plus n_sel groups' blocks, not all NB."""
    from longllama_lsp.model import attention as attention_module

    scored = []
    real = attention_module._quest_bound
    monkeypatch.setattr(attention_module, "_quest_bound", lambda qf, s: scored.append(s.num_blocks) or real(qf, s))
    q, k, v, mask, memory, _ = _planted(0)  # 64 blocks of 16
    attend(q, k, v, mask, memory, sparse=Sparse(BLOCK, 2 * BLOCK, **TWO_LEVEL))
    assert scored == [16, 2 * 4]  # 16 groups, then the blocks of the best 2 groups
    scored.clear()
    attend(q, k, v, mask, memory, sparse=Sparse(BLOCK, 2 * BLOCK))  # 64 blocks < coarse_from: flat
    assert scored == [64]


def test_group_summaries_bound_their_blocks():
    keys = torch.randn(1, 2, 10 * BLOCK + 5, 8)  # 11 blocks, the last short; groups of 4: the last of 3
    fine = memory_module.BlockSummary.of(keys, BLOCK)
    coarse = fine.coarse(4)
    assert coarse.num_blocks == 3 and coarse.size == 4 * BLOCK
    for gi, blocks in enumerate([range(0, 4), range(4, 8), range(8, 11)]):
        assert torch.equal(coarse.kmin[:, :, gi], fine.kmin[:, :, list(blocks)].amin(dim=2))
        assert torch.equal(coarse.kmax[:, :, gi], fine.kmax[:, :, list(blocks)].amax(dim=2))
    assert fine.coarse(4) is coarse  # kept


def test_config_rejects_a_budget_below_one_block():
    with pytest.raises(Exception, match="mem_budget"):  # wrapped by the strict dataclass validator
        make_tiny(mem_block_size=64, mem_budget=32)


# -- in the product: the engine's memory.selectTokens over a repository's bank (no copy) -----------------

CHUNK = 32  # tokens per planted bank chunk: one block of the default mem_block_size


@pytest.fixture
def sparse_engine(tiny_model_dir, smol_tokenizer, tmp_path):  # noqa: F811
    """An engine on its own tiny model (it sets the model's mem_budget) and a repository of 12 one-block
    chunks (c0.py ... c11.py) in a bank with block summaries, as the indexer leaves it."""
    import threading
    from types import SimpleNamespace

    from helpers_indexer import ChunkMeta

    from indexer.bank import MemoryBank
    from longllama_lsp.engine import Engine, EngineOptions
    from longllama_lsp.model import LongLlamaForCausalLM

    model = LongLlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    cfg = model.config
    bank = MemoryBank(cfg.mem_layers, cfg.num_key_value_heads, cfg.head_dim, getattr(torch, cfg.mem_dtype), "cpu",
                      block_size=cfg.mem_block_size)
    g = torch.Generator().manual_seed(7)
    for i in range(12):
        ids = torch.randint(100, 5000, (1, CHUNK), generator=g)
        bank.add(f"c{i}", model.encode_memory(ids), ChunkMeta(f"c{i}", f"c{i}.py", 1, 3, f"f{i}"))
    # Every chunk in memory (retrieve_tokens 0): these tests are about the block selection over all of it.
    engine = Engine(model, smol_tokenizer, options=EngineOptions(max_tokens=6, select_tokens=None, retrieve_tokens=0))
    engine.repositories = lambda: (SimpleNamespace(bank=bank, root=tmp_path, lock=threading.RLock(),
                                                   chunk=lambda path, text: [], chunk_text=lambda meta: None),)
    yield engine, bank
    engine.close()


PROMPT = "def main():\n    value = compute("


@pytest.fixture(params=["flat", "two-level"])
def selection(request, monkeypatch):
    """Both selections in the product: two-level forced on for the 12-block bank (groups of 2 blocks)."""
    if request.param == "two-level":
        from longllama_lsp.model import attention

        monkeypatch.setattr(attention, "COARSE_GROUP", 2)
        monkeypatch.setattr(attention, "COARSE_FROM_BLOCKS", 0)
    return request.param


def test_engine_sparse_selecting_every_live_block_equals_dense_without_copying_the_bank(sparse_engine, tmp_path,
                                                                                         selection):
    engine, bank = sparse_engine
    path = str(tmp_path / "c0.py")  # the current file: its chunk is masked out, so 11 blocks are live
    dense = engine.complete(PROMPT, len(PROMPT), path=path, key="dense")  # own keys: no prefix reuse
    assert engine.model.config.mem_budget is None
    engine.options.select_tokens = 11 * CHUNK  # < the 12 blocks of memory: the sparse path runs
    sparse = engine.complete(PROMPT, len(PROMPT), path=path, key="sparse")
    assert engine.model.config.mem_budget == 11 * CHUNK
    assert sparse.memory_tokens == dense.memory_tokens == 12 * CHUNK
    assert sparse.text == dense.text
    assert [s.path for s in sparse.sources] == [s.path for s in dense.sources]
    assert all(abs(a.weight - b.weight) < 1e-4 for a, b in zip(sparse.sources, dense.sources, strict=True))
    # The request attended to the bank's own tensors and summaries, not a copy of them.
    memory = engine._assembler._last[1].memory
    layer = engine.model.config.mem_layers[0]
    assert memory[layer].keys.data_ptr() == bank.memory()[layer].keys.data_ptr()


def test_engine_beyond_select_tokens_attends_only_to_the_selected_blocks(sparse_engine, selection):
    """A chunk whose keys span everything (its Quest bound tops every query) is selected, and with a
    one-block selection it is the only source; dense attention spreads over many chunks."""
    from helpers_indexer import ChunkMeta

    from longllama_lsp.model.memory import Memory

    engine, bank = sparse_engine
    layers = engine.model.config.mem_layers
    planted = bank.memory()
    spread = {i: MemCache(torch.linspace(-30, 30, CHUNK).view(1, 1, CHUNK, 1).expand_as(planted[i].keys[:, :, :CHUNK])
                          .to(planted[i].keys.dtype).contiguous(),
                          planted[i].values[:, :, :CHUNK].clone(), torch.zeros(1, 1, CHUNK, 1)) for i in layers}
    bank.add("planted", Memory(spread), ChunkMeta("planted", "planted.py", 1, 3, "planted"))
    dense = engine.complete(PROMPT, len(PROMPT), key="dense")
    assert len(dense.sources) > 1
    engine.options.select_tokens = CHUNK
    sparse = engine.complete(PROMPT, len(PROMPT), key="sparse")
    assert sparse.memory_tokens == 13 * CHUNK
    assert [s.path for s in sparse.sources] == ["planted.py"]
    engine.options.select_tokens = 0  # 0: dense again
    assert [s.path for s in engine.complete(PROMPT, len(PROMPT), key="again").sources] == \
        [s.path for s in dense.sources]
    assert engine.model.config.mem_budget is None


def _repeated(seed: int, copies: int = 52, hidden: int = 6):
    """Memory (B=1, Hkv=2, M=64 blocks of 16, D=16) shaped like a passkey prompt: one filler block
    repeated `copies` times (spread keys: a loose Quest bound, above the key's), `hidden` more copies
    masked, a key block pointing along each key/value head's mean query (a tight bound: the scores it
    has), and 5 other distinct blocks. Returns (q, k, v, mask, memory without ids, block ids)."""
    from longllama_lsp.model.memory import BlockIds

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 3, 16, generator=g)
    k, v = torch.randn(1, 2, 3, 16, generator=g), torch.randn(1, 2, 3, 16, generator=g)
    mask = torch.zeros(1, 1, 3, 3).masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), -1e9)
    nb = 64
    keys, values = torch.randn(1, 2, nb * BLOCK, 16, generator=g), 3 * torch.randn(1, 2, nb * BLOCK, 16, generator=g)
    filler_k, filler_v = 4 * torch.randn(1, 2, BLOCK, 16, generator=g), torch.randn(1, 2, BLOCK, 16, generator=g)
    direction = q.view(1, 2, 2, 3, 16).mean(dim=(2, 3))  # (B, Hkv, D)
    ids = torch.arange(nb) + 100  # distinct blocks: ids of their own
    order = torch.randperm(nb, generator=g).tolist()
    hidden_slots = torch.zeros(1, 1, nb * BLOCK, 1)
    for n, b in enumerate(order[:copies + hidden]):
        keys[:, :, b * BLOCK:(b + 1) * BLOCK], values[:, :, b * BLOCK:(b + 1) * BLOCK] = filler_k, filler_v
        ids[b] = 7
        if n >= copies:
            hidden_slots[:, :, b * BLOCK:(b + 1) * BLOCK] = MASK_MIN
    key = order[-1]
    keys[:, :, key * BLOCK:(key + 1) * BLOCK] = 8 * (direction / direction.norm(dim=-1, keepdim=True))[:, :, None]
    return q, k, v, mask, MemCache(keys, values, hidden_slots), BlockIds(BLOCK, ids)


@pytest.mark.parametrize("two_level", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_repeated_blocks_are_read_once_with_their_count_and_equal_dense(seed, two_level):
    """52 visible copies of one block + 6 distinct blocks, a budget of 8 blocks: with block ids the copies
    are one block weighted by log 52 (exp(s + log n) = n exp(s)), so sparse attention is dense attention;
    without ids the copies' bounds fill the budget and the key block is never read."""
    import dataclasses

    q, k, v, mask, memory, ids = _repeated(seed)
    sparse = Sparse(BLOCK, 8 * BLOCK, **(TWO_LEVEL if two_level else {}))
    dense, dense_w = attend(q, k, v, mask, memory, want_memory_weights=True)
    plain, _ = attend(q, k, v, mask, memory, sparse=sparse)
    assert (plain - dense).abs().max() > 0.05  # the copies crowd the distinct blocks out
    with_ids = dataclasses.replace(memory, block_ids=ids)
    out, weights = attend(q, k, v, mask, with_ids, want_memory_weights=True, sparse=sparse)
    assert (out - dense).abs().max() < 1e-5
    distinct = (ids.ids != 7).repeat_interleave(BLOCK)
    assert torch.allclose(weights[0][distinct], dense_w[0][distinct], atol=1e-5)  # each distinct block's mass
    # the copies' mass, all of it on the kept copy (sources name the first copy)
    assert torch.isclose(weights[0][~distinct].sum(), dense_w[0][~distinct].sum(), atol=1e-4)
    assert int((weights[0][~distinct].view(-1, BLOCK).sum(dim=-1) > 0).sum()) == 1


def test_distinct_blocks_keep_the_first_visible_copy_and_never_merge_unknown_ids():
    from longllama_lsp.model.memory import BlockIds

    keys = torch.zeros(1, 1, 6 * BLOCK, 4)
    mask = torch.zeros(1, 1, 6 * BLOCK, 1)
    mask[:, :, :BLOCK] = MASK_MIN  # block 0 hidden (a request's own file): its copies stand without it
    ids = BlockIds(BLOCK, torch.tensor([5, 5, 5, -1, -1, 9]))
    keep, log_count = MemCache(keys, keys.clone(), mask, block_ids=ids).distinct_blocks(BLOCK)
    assert keep[0].tolist() == [False, True, False, True, True, True]
    assert torch.allclose(log_count, torch.tensor([1, 2, 1, 1, 1, 1]).float().log())  # hidden or copies: 0
    assert MemCache(keys, keys.clone(), mask).distinct_blocks(BLOCK) is None  # no ids: no merging
    with pytest.raises(ValueError, match="block ids"):
        MemCache(keys, keys.clone(), mask, block_ids=BlockIds(BLOCK, torch.tensor([1, 2])))


def test_block_ids_survive_block_aligned_concat_and_moves():
    from longllama_lsp.model.memory import BlockIds

    def part(content: int, n: int) -> MemCache:
        z = torch.zeros(1, 1, n, 4)
        return MemCache(z, z.clone(), torch.zeros(1, 1, n, 1), block_ids=BlockIds.of_chunk(content, n, BLOCK))

    joined = MemCache.concat([part(1, 2 * BLOCK), part(2, BLOCK), part(1, 2 * BLOCK - 3)])
    assert joined.block_ids.ids.tolist() == [1 << 20, (1 << 20) + 1, 2 << 20, 1 << 20, (1 << 20) + 1]
    assert joined.to("cpu", torch.float16).block_ids is joined.block_ids
    assert MemCache.concat([part(1, BLOCK - 1), part(2, BLOCK)]).block_ids is None  # a block would mix two chunks
    z = torch.zeros(1, 1, BLOCK + 5, 4)
    moved = MemCache(z, z.clone(), torch.zeros(1, 1, BLOCK + 5, 1))  # no ids: a window moved to memory
    assert MemCache.concat([part(2, BLOCK), moved]).block_ids.ids.tolist() == [2 << 20, -1, -1]
