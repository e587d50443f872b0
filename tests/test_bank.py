"""indexer.bank: slot reuse, compaction, growth, exclusion, slot owners, budget eviction, store loading.

Test Data: synthetic memories (torch.randn) built in this file; no model, no fixtures.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexer.bank import MemoryBank, is_test_path
from indexer.quant import dequantize_rows, quantize_rows
from indexer.schema import FileRow, Fingerprint
from indexer.store import Store, index_path
from longllama_lsp.model.memory import MASK_MIN, MemCache, Memory

LAYERS, H, D = [0, 2], 2, 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def mem(n: int, seed: int, dtype: torch.dtype = torch.float32) -> Memory:
    g = torch.Generator().manual_seed(seed)
    return Memory({i: MemCache(torch.randn(1, H, n, D, generator=g).to(dtype),
                               torch.randn(1, H, n, D, generator=g).to(dtype),
                               torch.zeros(1, 1, n, 1)) for i in LAYERS})


def meta(path: str, ordinal: int = 0) -> SimpleNamespace:
    return SimpleNamespace(path=path, ordinal=ordinal)


def bank(device: str = "cpu", **kwargs) -> MemoryBank:
    return MemoryBank(LAYERS, H, D, torch.float32, device, **kwargs)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8).cpu()


def per_chunk(b: MemoryBank) -> dict:
    """Each resident chunk's slice of the assembled memory (bank order does not matter)."""
    m = b.memory()
    out = {}
    for cid in b.resident():
        r = b.chunk_slots(cid)
        out[cid] = [bits(t) for i in LAYERS for t in (m[i].keys[0, :, r.start:r.stop],
                                                       m[i].values[0, :, r.start:r.stop],
                                                       m[i].mask[0, 0, r.start:r.stop])]
    return out


def check(b: MemoryBank, model: dict) -> None:
    """The bank holds exactly `model` = {chunk_id: (Memory, meta)}, equal to a fresh rebuild."""
    assert set(b.resident()) == set(model)
    fresh = bank(b.device.type)
    for cid in sorted(model):
        fresh.add(cid, *model[cid])
    got, want = per_chunk(b), per_chunk(fresh)
    assert got.keys() == want.keys() and all(
        all(torch.equal(x, y) for x, y in zip(got[c], want[c], strict=True)) for c in got)
    m = b.memory()
    visible = int((m[LAYERS[0]].mask == 0).sum())
    assert visible == sum(mm.num_tokens for mm, _ in model.values()) == b.status().live_tokens
    for cid, (_, md) in model.items():
        r = b.chunk_slots(cid)
        assert b.slot_owner(r.start) is md and b.slot_owner(r.stop - 1) is md
    owners = sum(b.slot_owner(s) is not None for s in range(m.num_tokens))
    assert owners == visible


@pytest.mark.parametrize("device", DEVICES)
def test_add_remove_reuse(device):
    b, model = bank(device, compact_threshold=0.5), {}
    for cid, n in enumerate([10, 10, 10]):
        model[cid] = (mem(n, cid), meta("a.py", cid))
        assert b.add(cid, *model[cid])
    assert b.remove(1) and not b.remove(1)
    del model[1]
    assert b.status().span_tokens == 30 and b.status().fragmentation == pytest.approx(1 / 3)
    for cid, n in [(3, 4), (4, 6)]:  # first fit: both land in the hole
        model[cid] = (mem(n, cid), meta("b.py", cid))
        b.add(cid, *model[cid])
    assert b.chunk_slots(3) == range(10, 14) and b.chunk_slots(4) == range(14, 20)
    assert b.status().span_tokens == 30 and b.status().fragmentation == 0
    check(b, model)
    b.add(0, *model[0])  # re-adding replaces
    check(b, model)


def test_auto_compaction_and_growth():
    b, model = bank(capacity_tokens=4), {}
    for cid in range(6):
        model[cid] = (mem(7, cid), meta(f"f{cid % 2}.py", cid))
        b.add(cid, *model[cid])
    assert b.status().capacity_tokens == 64  # 4 -> 8 -> 16 -> 32 -> 64
    check(b, model)
    assert b.remove_file("f0.py") == 3
    for cid in (0, 2, 4):
        del model[cid]
    s = b.status()  # holes were half the span: compacted
    assert (s.span_tokens, s.fragmentation) == (21, 0)
    check(b, model)


def test_compact_with_overlapping_blocks():
    b, model = bank(compact_threshold=1.0), {}
    for cid, n in enumerate([3, 9, 5, 11]):
        model[cid] = (mem(n, cid), meta("a.py", cid))
        b.add(cid, *model[cid])
    b.remove(0)
    b.remove(2)
    del model[0], model[2]
    b.compact(block=2)  # moves by 3 with blocks of 2: non-overlapping; then by 8: overlapping copies
    assert b.status().span_tokens == 20
    check(b, model)


def test_memory_views_and_exclusion():
    b = bank()
    for cid, path in enumerate(["a.py", "a.py", "b.py"]):
        b.add(cid, mem(5, cid), meta(path, cid))
    full = b.memory()
    assert b.memory() is full  # cached until the bank changes
    ex = b.memory(exclude_paths=["a.py"])
    assert ex[0].keys.untyped_storage().data_ptr() == full[0].keys.untyped_storage().data_ptr()  # no copy
    assert torch.all(ex[0].mask[0, 0, :10] == MASK_MIN) and torch.all(ex[0].mask[0, 0, 10:] == 0)
    assert torch.all(full[0].mask == 0)  # the bank's own mask is untouched
    ex = b.memory(exclude_chunks=[2, 99])
    assert int((ex[2].mask == 0).sum()) == 10
    assert full[0].keys.shape == (1, H, 15, D) and full[0].mask.shape == (1, 1, 15, 1)
    b.remove(2)
    assert b.memory() is not full and b.slot_owner(12) is None and b.slot_owner(3).path == "a.py"


def test_add_validates():
    b = bank()
    with pytest.raises(ValueError, match="layers"):
        b.add(0, Memory({0: mem(3, 0)[0]}), meta("a.py"))
    with pytest.raises(ValueError, match="bfloat16"):
        b.add(0, mem(3, 0, torch.bfloat16), meta("a.py"))


# -- budget ----------------------------------------------------------------------------------------

def test_is_test_path():
    tests = ["tests/a.py", "pkg/test_x.py", "x_test.go", "a.spec.ts", "src/__tests__/b.js"]
    assert all(map(is_test_path, tests))
    assert not any(map(is_test_path, ["src/a.py", "pkg/testing.py", "contest.py"]))


def test_budget_evicts_lowest_priority():
    b = bank(budget_tokens=30)
    assert b.add("s0", mem(10, 0), meta("src/a.py", 0)) and b.add("s1", mem(10, 1), meta("src/a.py", 1))
    assert b.add("t0", mem(10, 2), meta("tests/test_a.py", 0))
    assert not b.add("t1", mem(10, 3), meta("tests/test_a.py", 1))  # lowest of all: dropped
    b.touch("tests/test_a.py")  # the user opened the test: it now outranks everything
    assert b.add("t1", mem(10, 3), meta("tests/test_a.py", 1))  # evicts src/a.py's second chunk
    assert set(b.resident()) == {"s0", "t0", "t1"} and set(b.evicted()) == {"s1"}
    assert not b.add("big", mem(31, 4), meta("src/big.py"))  # larger than the whole budget
    s = b.status()
    assert (s.live_tokens, s.evicted_chunks, s.evicted_tokens, s.evictions) == (30, 2, 41, 3)
    b.remove_file("src/big.py")
    b.remove_file("tests/test_a.py")
    assert set(b.evicted()) == {"s1"} and b.status().live_tokens == 10


def test_touch_ranks_directory_and_recency():
    b = bank(budget_tokens=20)
    b.touch("pkg/x.py")
    b.touch("other/y.py")
    b.add("sib", mem(10, 0), meta("pkg/sibling.py"))
    b.add("y", mem(10, 1), meta("other/y.py"))
    assert b.add("far", mem(10, 2), meta("far/z.py")) is False  # sib is in a touched directory
    b.touch("pkg/x.py")
    assert b.add("x", mem(10, 3), meta("pkg/x.py")) and set(b.resident()) == {"x", "y"}  # touched files first


# -- random operation sequences against a dict model ---------------------------------------------

OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 11), st.integers(1, 9), st.sampled_from("abcd")),
    st.tuples(st.just("remove"), st.integers(0, 11)),
    st.tuples(st.just("remove_file"), st.sampled_from("abcd")),
    st.tuples(st.just("compact"), st.sampled_from([2, 4096])),
), max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, st.sampled_from([0.25, 1.0]))
def test_random_ops_match_dict_model(ops, threshold):
    b, model = bank(capacity_tokens=8, compact_threshold=threshold), {}
    for k, op in enumerate(ops):
        if op[0] == "add":
            _, cid, n, path = op
            model[cid] = (mem(n, k), meta(f"{path}.py", cid))
            b.add(cid, *model[cid])
        elif op[0] == "remove":
            assert b.remove(op[1]) == (model.pop(op[1], None) is not None)
        elif op[0] == "remove_file":
            gone = [c for c, (_, md) in model.items() if md.path == f"{op[1]}.py"]
            assert b.remove_file(f"{op[1]}.py") == len(gone)
            for c in gone:
                del model[c]
        else:
            b.compact(block=op[1])
        assert b.status().fragmentation <= threshold
    check(b, model)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 11), st.integers(1, 9), st.sampled_from(["a.py", "tests/t.py"])),
                max_size=20))
def test_random_adds_respect_budget(adds):
    b, live = bank(budget_tokens=20), {}
    for k, (cid, n, path) in enumerate(adds):
        live[cid] = (mem(n, k), meta(path, k % 3))
        b.add(cid, *live[cid])
        assert b.status().live_tokens <= 20
        assert set(b.resident()) | set(b.evicted()) == set(live)
        assert not set(b.resident()) & set(b.evicted())
    check(b, {c: live[c] for c in b.resident()})


# -- store integration -----------------------------------------------------------------------------

def test_load_from_store_is_what_the_store_holds_and_budget(tmp_path):
    fp = Fingerprint("c", "w", "t", "bfloat16", LAYERS, H, D)
    memories = {}
    with Store.open(index_path(tmp_path, fp), fp) as store:
        for path, texts in {"src/a.py": ["a0", "a1", "shared"], "tests/test_a.py": ["t0", "shared"]}.items():
            chunks = [SimpleNamespace(start_byte=0, end_byte=1, start_line=1, end_line=1, symbol=None,
                                      kind=None, token_count=6, content_hash=hashlib.sha256(t.encode()).hexdigest())
                      for t in texts]
            store.replace_file(FileRow(path, path, 1, 1), chunks)
            memories |= {c.content_hash: mem(6, len(memories), torch.bfloat16) for c in chunks}
        memories.pop(hashlib.sha256(b"a1").hexdigest())  # a chunk not encoded yet is not loaded
        store.put_memories(memories)

        b = MemoryBank.for_store(store, "cpu")
        assert b.load_from_store(store) == 4
        rows = {r.id: r for r in store.chunks()}
        for cid, md in b.resident().items():
            assert md == rows[cid]
            r, want = b.chunk_slots(cid), memories[md.content_hash]
            for i in LAYERS:
                stored = dequantize_rows(*quantize_rows(want[i].keys[0]), torch.bfloat16)  # the store's int8 rows
                assert torch.equal(bits(b.memory()[i].keys[0, :, r.start:r.stop]), bits(stored))
        assert {md.path for md in b.resident().values()} == {"src/a.py", "tests/test_a.py"}
        ids = b.memory()[LAYERS[0]].block_ids.ids  # the "shared" chunk of both files: the same blocks
        first = {md.path: ids[b.chunk_slots(cid).start // b.block_size].item() for cid, md in b.resident().items()
                 if md.content_hash == hashlib.sha256(b"shared").hexdigest()}
        assert len(first) == 2 and len(set(first.values())) == 1
        assert len(set(ids.tolist())) == 3  # a0, t0, shared

        small = MemoryBank.for_store(store, "cpu", budget_tokens=12)
        assert small.load_from_store(store) == 2  # non-test code first, file heads first
        assert sorted((m.path, m.ordinal) for m in small.resident().values()) == [("src/a.py", 0),
                                                                                  ("src/a.py", 2)]
        small.touch("tests/test_a.py")
        assert small.load_from_store(store, paths=["tests/test_a.py"]) == 2
        assert {m.path for m in small.resident().values()} == {"tests/test_a.py"}
        assert small.status().evicted_chunks == 2


# -- block summaries (sparse memory) -----------------------------------------------------------------

def check_summaries(b: MemoryBank) -> None:
    """Every chunk starts on a block boundary; each of its blocks' summary is the min/max of exactly
    its own keys (no other chunk's, no padding's)."""
    bs, m = b.block_size, b.memory()
    for cid in b.resident():
        r = b.chunk_slots(cid)
        assert r.start % bs == 0
        for i in LAYERS:
            keys, summary = m[i].keys[0, :, r.start:r.stop], m[i].summary
            assert summary.kmin.shape[2] == m.num_tokens // bs
            for j, s0 in enumerate(range(0, len(r), bs)):
                blk = r.start // bs + j
                assert torch.equal(summary.kmin[0, :, blk], keys[:, s0:s0 + bs].amin(dim=1))
                assert torch.equal(summary.kmax[0, :, blk], keys[:, s0:s0 + bs].amax(dim=1))


def churn(b: MemoryBank, model: dict, steps: int, seed: int, make):
    """Random adds (make(cid, step, rng) -> (memory, meta, content)) and removes of 12 chunk ids, through
    growth and compaction, kept in `model` {cid: what make returned}; yields after each."""
    rng = torch.Generator().manual_seed(seed)
    for step in range(steps):
        cid = int(torch.randint(0, 12, (1,), generator=rng))
        if cid in model and step % 3 == 0:
            b.remove(cid)
            del model[cid]
        else:
            model[cid] = make(cid, step, rng)
            b.add(cid, *model[cid])
        yield


def test_block_summaries_follow_adds_removes_compaction_and_growth():
    b, model = bank(block_size=4, capacity_tokens=8, compact_threshold=0.3), {}
    for _ in churn(b, model, 40, 0, lambda cid, step, rng: (mem(int(torch.randint(1, 11, (1,), generator=rng)), step),
                                                             meta(f"f{cid % 3}.py", cid), None)):
        check_summaries(b)
    check(b, {c: m[:2] for c, m in model.items()})
    b.compact()
    check_summaries(b)


def test_block_ids_name_contents_through_adds_removes_compaction_and_growth():
    """Blocks of chunks with equal content share ids (block j of content k: k * 2^20 + j), free blocks
    are -1, and a content no resident chunk holds is forgotten."""
    def make(cid, step, rng):
        content = int(torch.randint(0, 4, (1,), generator=rng))  # few contents: many repeats
        return mem(3 + 2 * content, content), meta(f"f{cid % 3}.py", cid), f"hash{content}"  # equal content, length

    b, model = bank(block_size=4, capacity_tokens=8, compact_threshold=0.3), {}
    for _ in churn(b, model, 60, 1, make):
        ids = b.memory()[LAYERS[0]].block_ids.ids
        by_content: dict[str, list[int]] = {}
        owned = torch.zeros_like(ids, dtype=torch.bool)
        for c, (_, _, content) in model.items():
            r = b.chunk_slots(c)
            blocks = ids[r.start // 4:(r.start + len(r) + 3) // 4]
            owned[r.start // 4:(r.start + len(r) + 3) // 4] = True
            assert blocks.tolist() == [blocks[0].item() + j for j in range(len(blocks))]
            by_content.setdefault(content, []).append(blocks[0].item())
        assert all(len(set(v)) == 1 for v in by_content.values())  # equal content, equal ids
        assert len({v[0] for v in by_content.values()}) == len(by_content)  # other content, other ids
        assert (ids[~owned] == -1).all()
        assert len(b._contents) == len(by_content)
    for c in list(model):
        b.remove(c)
    assert not b._contents and not b._content_refs
    b.add("x", mem(5, 0), meta("x.py"))  # content unknown: never merged
    assert (b.memory()[LAYERS[0]].block_ids.ids == -1).all()


def test_bank_memory_carries_its_summaries_to_the_model(monkeypatch):
    """The model uses the bank's summaries as they are: sparse attention over bank memory summarises
    nothing itself, and with the budget at the live blocks equals dense attention."""
    from longllama_lsp.model import memory as memory_module
    from longllama_lsp.model.attention import Sparse, attend

    b = bank(block_size=4, compact_threshold=1.0)
    for cid, n in enumerate([5, 9, 3, 8]):  # 2 + 3 + 1 + 2 blocks
        b.add(cid, mem(n, cid), meta("a.py", cid))
    b.remove(1)
    monkeypatch.setattr(memory_module.BlockSummary, "of", None)  # would raise if called
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 3, D, generator=g), torch.randn(1, H, 3, D, generator=g),
               torch.randn(1, H, 3, D, generator=g))
    mask = torch.zeros(1, 1, 3, 3)
    memory = b.memory()[0]
    dense, _ = attend(q, k, v, mask, memory)
    sparse, _ = attend(q, k, v, mask, memory, sparse=Sparse(4, 5 * 4))  # the 5 live blocks
    assert memory.num_tokens == 8 * 4
    assert (dense - sparse).abs().max() < 1e-6


def test_views_share_summaries_their_coarse_level_and_cast_until_the_bank_changes():
    """Each request's view masks another file; its summaries (and what selection derives from them:
    the coarse level, the compute-dtype copy) are the bank's until the bank changes, not rebuilt per
    request (at 1M tokens that was tens of ms per request)."""
    b = bank(block_size=4, compact_threshold=1.0)
    for cid, n in enumerate([5, 9, 3, 8]):
        b.add(cid, mem(n, cid), meta(f"f{cid}.py", cid))
    first, second = b.memory(exclude_paths=["f0.py"])[0].summary, b.memory(exclude_paths=["f1.py"])[0].summary
    assert first is second and b.memory()[0].summary is first
    assert first.coarse(2) is second.coarse(2)
    assert first.cast("cpu", torch.bfloat16) is second.cast("cpu", torch.bfloat16)
    assert first.cast("cpu", torch.bfloat16).kmin.dtype == torch.bfloat16 and first.cast("cpu", first.kmin.dtype) is first
    b.add(9, mem(4, 9), meta("f9.py", 9))
    after = b.memory(exclude_paths=["f0.py"])[0].summary
    assert after is not first and after.num_blocks == first.num_blocks + 1
    b.reserve(4096)  # new storage: no view of the old one stays cached
    assert b.memory(exclude_paths=["f0.py"])[0].summary is not after
