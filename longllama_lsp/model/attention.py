"""Pure tensor functions of the attention path: RoPE, local + memory attention, top-k retrieval.

Letters used in shapes: B batch, H query heads, Hkv key/value heads, G = H // Hkv query heads per
key/value head, T queries, L local keys, M memory keys, K retrieved keys, D head dim.

Memory attention is LongLLaMA's (spec §2.2): ONE softmax over the local causal keys and all memory
keys, with the same 1/sqrt(D) scale; scores are clamped from below at max(finfo.min, -1e6) after the
additive masks, exactly as the reference, so masked rows behave identically (even fully masked
padding rows, whose logits the golden tests compare).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .memory import MASK_MIN, BlockSummary, MemCache, any_in_groups

# Memory keys scored per block; bounds the (T, M) score matrix to (T, MEM_BLOCK) at a time.
MEM_BLOCK = 16384
# Queries that share one block selection in sparse memory attention (prefill); decode has one.
SPARSE_QUERY_TILE = 128
# Two-level selection: from COARSE_FROM_BLOCKS blocks on, groups of COARSE_GROUP blocks are scored first
# and only the best groups' blocks are scanned. At 1M tokens (32,768 blocks of 32) the flat scan reads
# 2 x 25 MB of summaries per memory layer and step, the whole decode overhead on a CPU (BENCHMARKS.md);
# the coarse level is 1,024 groups. Below 4,096 blocks (131k tokens) the flat scan is cheap and kept.
COARSE_GROUP = 32
COARSE_FROM_BLOCKS = 4096


@dataclass(frozen=True)
class Sparse:
    """Block-sparse memory attention: blocks of `block_size` memory slots, at most `budget` slots attended;
    with more than `coarse_from` blocks, selection first ranks groups of `group` blocks."""

    block_size: int
    budget: int
    group: int = field(default_factory=lambda: COARSE_GROUP)  # read when built: benches compare flat
    coarse_from: int = field(default_factory=lambda: COARSE_FROM_BLOCKS)

    def applies(self, memory: MemCache | None) -> bool:
        return memory is not None and memory.num_tokens > self.budget


def min_score(dtype: torch.dtype) -> float:
    return max(torch.finfo(dtype).min, -1e6)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype,
                 scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (B, T, D) for integer positions (B, T); HF's rotate_half convention (spec §1.3)."""
    freqs = positions[..., None].float() * inv_freq.float()  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, T, D)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, Hkv, G, T, D): query heads grouped by the key/value head they share."""
    b, h, t, d = q.shape
    return q.view(b, kv_heads, h // kv_heads, t, d)


def _flat(q: torch.Tensor) -> torch.Tensor:
    """(B, Hk, G, T, D) -> (B, Hk, G*T, D): one plain matmul per key/value head, no broadcast copies."""
    b, hk, g, t, d = q.shape
    return q.reshape(b, hk, g * t, d)


def _local_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, Hk, G, T, D), k (B, Hk, L, D), mask (B, 1, T, L) -> clamped scores (B, Hk, G, T, L)."""
    b, hk, g, t, _ = q.shape
    s = torch.matmul(_flat(q), k.transpose(-1, -2)).view(b, hk, g, t, -1) * scale
    return torch.clamp_min(s + mask[:, :, None], min_score(s.dtype))


def _memory_scores(q: torch.Tensor, mem_k: torch.Tensor, mem_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, Hk, G, T, D), mem_k (B, Hk, M, D), mem_mask (B, 1 or Hk, M, 1) -> (B, Hk, G, T, M)."""
    b, hk, g, t, _ = q.shape
    s = torch.matmul(_flat(q), mem_k.to(q.dtype).transpose(-1, -2)).view(b, hk, g, t, -1) * scale
    mask = mem_mask[:, :, :, 0].to(s.dtype)[:, :, None, None, :]  # (B, 1 or Hk, 1, 1, M)
    return torch.clamp_min(s + mask, min_score(s.dtype))


def _on_device(memory: MemCache | None, device: torch.device) -> MemCache | None:
    """Memory on the queries' device: the host tier (keys/values in host memory) is copied over once,
    here, for the paths that read all of it (dense, top-k, sdpa); sparse attention gathers its blocks."""
    if memory is None or memory.keys.device == device:
        return memory
    return memory.to(device)


def _weighted(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """w (B, Hk, G, T, N) @ v (B, Hk, N, D) -> (B, Hk, G, T, D)."""
    b, hk, g, t, n = w.shape
    return torch.matmul(w.reshape(b, hk, g * t, n), v).view(b, hk, g, t, -1)


def _one_softmax(s_loc: torch.Tensor, v: torch.Tensor, s_mem: torch.Tensor,
                 mem_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Local scores s_loc (B, Hk, G, T, L) and memory scores s_mem (B, Hk, G, T, N) under ONE softmax.

    Returns the local values v (B, Hk, L, D) weighted, plus memory values mem_v (B, Hk, N, D) weighted
    when given (top-k weighs its own per-query values): (B, Hk, G, T, D); and the memory
    probabilities (B, Hk, G, T, N) in float32.
    """
    w = torch.softmax(torch.cat([s_loc, s_mem], dim=-1), dim=-1, dtype=torch.float32)
    n_loc = s_loc.shape[-1]
    w_mem = w[..., n_loc:]
    out = _weighted(w[..., :n_loc].to(v.dtype), v)
    if mem_v is not None:
        out = out + _weighted(w_mem.to(v.dtype), mem_v.to(v.dtype))
    return out, w_mem


def _mass_per_slot(slots: torch.Tensor, mass: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Attention mass (B, ...) on memory slots `slots` (B, ..., same shape) summed per slot: (B, num_slots)."""
    b = slots.shape[0]
    weights = torch.zeros(b, num_slots, dtype=torch.float32, device=mass.device)
    return weights.scatter_add_(1, slots.reshape(b, -1), mass.reshape(b, -1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           memory: MemCache | None = None, grouping: tuple[int, int] | None = None,
           topk: int | None = None, want_memory_weights: bool = False, sparse: Sparse | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Local causal attention plus (optionally) memory, one softmax.

    q: (B, H, T, D) rotated; k, v: (B, Hkv, L, D) rotated local keys and values; mask: (B, 1, T, L)
    additive. memory: keys/values (B or 1, Hkv, M, D). grouping: (heads, queries) tile as the
    reference's mem_attention_grouping (pure tiling, same result). topk: attend only to the top-k
    memory keys of each query and head (exact retrieval; k >= M equals dense; with sparse, the top-k
    of the selected blocks' keys). sparse: when memory
    exceeds its budget, each query tile attends to the memory blocks its block summaries rank highest
    (see _attend_sparse); within the budget, dense.
    Returns (B, H, T, D) and, if asked, memory attention mass (B, M) summed over heads and queries.
    """
    b, h, t, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    if memory is not None and memory.num_tokens == 0:
        memory = None
    blocks = None
    if sparse is not None and sparse.applies(memory):
        blocks = _SparseState.of(memory, sparse, q.device, q.dtype, b)
    else:  # the sparse path gathers only its selected blocks from the host tier; the others read it all
        memory = _on_device(memory, q.device)
    if memory is not None and memory.keys.shape[0] != b:
        memory = MemCache(memory.keys.expand(b, -1, -1, -1), memory.values.expand(b, -1, -1, -1),
                          memory.mask.expand(b, -1, -1, -1))
    tile_h, tile_q = grouping if grouping else (h, t)
    tile_kv = max(1, math.ceil(tile_h / g))  # tile over key/value heads so GQA groups stay whole
    if topk is not None and memory is not None and topk < memory.num_tokens:
        tile_q = min(tile_q, 128)  # gathered (T, K, D) values grow with T: keep tiles small
    if blocks is not None:
        tile_q = min(tile_q, SPARSE_QUERY_TILE)
    qg = _grouped(q, hkv)  # (B, Hkv, G, T, D)
    outs, weights = [], None
    if want_memory_weights and memory is not None:
        weights = torch.zeros(b, memory.num_tokens, dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(d)
    for h0 in range(0, hkv, tile_kv):
        hs = slice(h0, min(h0 + tile_kv, hkv))
        mem = None if memory is None else MemCache(memory.keys[:, hs], memory.values[:, hs], memory.mask)
        row = []
        for t0 in range(0, t, tile_q):
            ts = slice(t0, min(t0 + tile_q, t))
            if blocks is not None:
                s_loc = _local_scores(qg[:, hs, :, ts], k[:, hs], mask[:, :, ts], scale)
                out_tile, w_tile = _attend_sparse(qg[:, hs, :, ts], s_loc, v[:, hs], mem, blocks.heads(hs),
                                                  scale, topk, weights is not None)
            else:
                out_tile, w_tile = _attend_tile(qg[:, hs, :, ts], k[:, hs], v[:, hs], mask[:, :, ts], mem,
                                                scale, topk, weights is not None)
            row.append(out_tile)
            if w_tile is not None:
                weights += w_tile
        outs.append(torch.cat(row, dim=3))
    out = torch.cat(outs, dim=1)  # (B, Hkv, G, T, D)
    return out.reshape(b, h, t, d), weights


def _attend_tile(q, k, v, mask, mem, scale, topk, want_weights):
    """One (heads, queries) tile of `attend`; q (B, Hk, G, T, D). Returns ((B, Hk, G, T, D), weights)."""
    s_loc = _local_scores(q, k, mask, scale)  # (B, Hk, G, T, L)
    if mem is None:
        w = torch.softmax(s_loc, dim=-1, dtype=torch.float32).to(q.dtype)
        return _weighted(w, v), None
    if topk is not None and topk < mem.num_tokens:
        return _attend_topk(q, s_loc, v, mem, scale, topk, want_weights)
    if mem.num_tokens <= MEM_BLOCK:
        s_mem = _memory_scores(q, mem.keys, mem.mask, scale)  # (B, Hk, G, T, M)
        out, w_mem = _one_softmax(s_loc, v, s_mem, mem.values)
        return out, (w_mem.sum(dim=(1, 2, 3)) if want_weights else None)
    return _attend_blocked(q, s_loc, v, mem, scale, want_weights)


def _attend_blocked(q, s_loc, v, mem, scale, want_weights):
    """Dense memory attention streamed over memory blocks with a running log-sum-exp (flash-style)."""
    s_loc = s_loc.float()
    run_max = s_loc.amax(dim=-1, keepdim=True)  # (B, Hk, G, T, 1)
    p = torch.exp(s_loc - run_max)
    run_sum = p.sum(dim=-1, keepdim=True)
    acc = _weighted(p, v.float())  # (B, Hk, G, T, D)
    for m0 in range(0, mem.num_tokens, MEM_BLOCK):
        ms = slice(m0, m0 + MEM_BLOCK)
        s = _memory_scores(q, mem.keys[:, :, ms], mem.mask[:, :, ms], scale).float()
        new_max = torch.maximum(run_max, s.amax(dim=-1, keepdim=True))
        correction = torch.exp(run_max - new_max)
        p = torch.exp(s - new_max)
        run_sum = run_sum * correction + p.sum(dim=-1, keepdim=True)
        acc = acc * correction + _weighted(p, mem.values[:, :, ms].float())
        run_max = new_max
    out = (acc / run_sum).to(q.dtype)
    weights = None
    if want_weights:  # second pass: exact probabilities per memory slot
        weights = torch.cat([
            (torch.exp(_memory_scores(q, mem.keys[:, :, m0:m0 + MEM_BLOCK], mem.mask[:, :, m0:m0 + MEM_BLOCK],
                                      scale).float() - run_max) / run_sum).sum(dim=(1, 2, 3))
            for m0 in range(0, mem.num_tokens, MEM_BLOCK)], dim=-1)
    return out, weights


def _attend_topk(q, s_loc, v, mem, scale, topk, want_weights):
    """Each query and head attends to its top-k memory keys (exact search, blockwise) plus local keys."""
    best_s = best_i = None
    for m0 in range(0, mem.num_tokens, MEM_BLOCK):
        s = _memory_scores(q, mem.keys[:, :, m0:m0 + MEM_BLOCK], mem.mask[:, :, m0:m0 + MEM_BLOCK], scale)
        idx = torch.arange(m0, m0 + s.shape[-1], device=s.device).expand_as(s)
        if best_s is not None:
            s, idx = torch.cat([best_s, s], dim=-1), torch.cat([best_i, idx], dim=-1)
        best_s, pos = torch.topk(s, min(topk, s.shape[-1]), dim=-1)  # (B, Hk, G, T, K)
        best_i = torch.gather(idx, -1, pos)
    out, w_mem = _one_softmax(s_loc, v, best_s)
    bsz, hk, g, t, kk = best_i.shape
    vals = mem.values  # (B, Hk, M, D), gathered before the cast: only K rows per query are converted
    flat = best_i.reshape(bsz, hk, g * t * kk, 1).expand(-1, -1, -1, vals.shape[-1])
    picked = torch.gather(vals, 2, flat).view(bsz, hk, g, t, kk, -1).to(q.dtype)  # (B, Hk, G, T, K, D)
    out = out + torch.einsum("bhgtk,bhgtkd->bhgtd", w_mem.to(q.dtype), picked)
    return out, (_mass_per_slot(best_i, w_mem, mem.num_tokens) if want_weights else None)


@dataclass
class _SparseState:
    """What selection needs, on the queries' device: summaries (B, Hkv, NB, D), visible blocks (B, NB),
    and for two-level selection the groups' summaries (B, Hkv, NG, D) and visible groups (B, NG)."""

    summary: BlockSummary
    visible: torch.Tensor
    budget: int
    coarse: BlockSummary | None = None
    coarse_visible: torch.Tensor | None = None
    # (NB,) log of how many visible copies each kept block stands for (MemCache.distinct_blocks); None: 1
    log_count: torch.Tensor | None = None

    @classmethod
    def of(cls, memory: MemCache, sparse: Sparse, device, dtype: torch.dtype, batch: int) -> _SparseState:
        # Built once per memory and kept in the compute dtype and device: converting (B, Hkv, NB, D)
        # every step costs more than scoring.
        summary = memory.blocks(sparse.block_size, device).cast(device, dtype)
        visible = memory.visible_blocks(sparse.block_size, device)
        distinct = memory.distinct_blocks(sparse.block_size, device)
        log_count = None
        if distinct is not None:  # copies of a block are hidden behind the first, which counts them
            visible, log_count = distinct
        coarse = coarse_visible = None
        if summary.num_blocks > sparse.coarse_from:
            coarse = summary.coarse(sparse.group)  # kept with the summary
            if distinct is None:
                coarse_visible = memory.visible_groups(sparse.block_size, sparse.group, device)  # (B, NG), kept
            else:
                coarse_visible = any_in_groups(visible, sparse.group)  # (B, NG)
        state = cls(summary, visible, sparse.budget, coarse, coarse_visible, log_count)
        return state.expand(batch) if summary.kmin.shape[0] != batch else state

    def expand(self, batch: int) -> _SparseState:
        """A batch-1 memory's state for `batch` query rows (views, no copies)."""
        def wide(s: BlockSummary | None) -> BlockSummary | None:
            return None if s is None else BlockSummary(s.size, s.kmin.expand(batch, -1, -1, -1),
                                                       s.kmax.expand(batch, -1, -1, -1))
        cv = None if self.coarse_visible is None else self.coarse_visible.expand(batch, -1)
        return _SparseState(wide(self.summary), self.visible.expand(batch, -1), self.budget, wide(self.coarse), cv,
                            self.log_count)

    def heads(self, hs: slice) -> _SparseState:
        def part(s: BlockSummary | None) -> BlockSummary | None:
            return None if s is None else BlockSummary(s.size, s.kmin[:, hs], s.kmax[:, hs])
        return _SparseState(part(self.summary), self.visible, self.budget, part(self.coarse), self.coarse_visible,
                            self.log_count)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, h, index[b, h, k]] for x (B, Hk, N, D) and index (B, Hk, K): (B, Hk, K, D), on x's device.

    Whole D-rows with index_select per (row, head), which also reads batch-expanded or head-sliced
    views and memory-mapped host tiers without a copy: torch.gather with an index expanded over D cost
    ~4x more (a fifth of a 1M-token decode step on the CPU).
    """
    b, hk, k = index.shape
    index = index.to(x.device)
    out = [x[i, h].index_select(0, index[i, h]) for i in range(b) for h in range(hk)]  # each (K, D)
    return torch.stack(out).view(b, hk, k, x.shape[-1])


def _quest_bound(qf: torch.Tensor, summary: BlockSummary) -> torch.Tensor:
    """Quest's bound sum_d max(q_d kmin_d, q_d kmax_d) >= q.k for every key of a block, maxed over the
    queries: qf (B, Hk, N, D), summaries (B, Hk, NB, D) -> (B, Hk, NB)."""
    bound = (torch.matmul(qf.clamp(min=0), summary.kmax.transpose(-1, -2))
             + torch.matmul(qf.clamp(max=0), summary.kmin.transpose(-1, -2)))  # (B, Hk, N, NB)
    return bound.amax(dim=2)


def _select_blocks(qf: torch.Tensor, blocks: _SparseState, n_sel: int) -> torch.Tensor:
    """The `n_sel` blocks with the highest bound for queries qf (B, Hk, N, D): (B, Hk, n_sel), sorted."""
    bonus = None if blocks.log_count is None else blocks.log_count * math.sqrt(qf.shape[-1])  # (NB,) in q.k units
    if blocks.coarse is None:
        score = _quest_bound(qf, blocks.summary)
        if bonus is not None:  # a block standing for n copies bounds n copies' mass: rank by bound + log n
            score = score + bonus.to(score.dtype)
        score = score.masked_fill(~blocks.visible[:, None], float("-inf"))
        return torch.topk(score, n_sel, dim=-1, sorted=False).indices.sort(dim=-1).values
    # Two levels: the best n_sel groups (every selected block could sit in a different group), then
    # the best n_sel of their blocks. A group's bound is >= its blocks', so a block that dominates q.k
    # lifts its group too.
    b, hk, _, d = qf.shape
    nb, group = blocks.summary.num_blocks, blocks.coarse.size // blocks.summary.size
    g_score = _quest_bound(qf, blocks.coarse).masked_fill(~blocks.coarse_visible[:, None], float("-inf"))
    groups = torch.topk(g_score, min(n_sel, g_score.shape[-1]), dim=-1, sorted=False).indices  # (B, Hk, Sg)
    cand = (groups[..., None] * group + torch.arange(group, device=qf.device)).reshape(b, hk, -1)  # (B, Hk, C)
    real = cand < nb  # the last group may be short
    cand = cand.clamp(max=nb - 1)
    fine = BlockSummary(blocks.summary.size, _rows(blocks.summary.kmin, cand),
                        _rows(blocks.summary.kmax, cand))  # (B, Hk, C, D)
    seen = torch.gather(blocks.visible[:, None].expand(b, hk, nb), 2, cand)  # (B, Hk, C)
    # Hidden blocks rank below every visible one and clamped repeats below them: never picked twice.
    score = _quest_bound(qf, fine)
    if bonus is not None:
        score = score + bonus.to(score.dtype)[cand]
    score = score.masked_fill(~seen, torch.finfo(qf.dtype).min).masked_fill(~real, float("-inf"))
    pick = torch.topk(score, n_sel, dim=-1, sorted=False).indices
    return torch.gather(cand, 2, pick).sort(dim=-1).values


def _attend_sparse(q, s_loc, v, mem: MemCache, blocks: _SparseState, scale, topk, want_weights):
    """Local keys plus the top memory blocks of this query tile, one softmax (Quest-style selection);
    with topk, each query and head then keeps only its own top-k keys of those blocks (FoT's kNN).

    A block's score is the Quest bound, taken as the max over the tile's queries and the query heads
    of each key/value head (GQA), so a block that any of them needs is kept (_select_blocks). Only the
    selected blocks' keys/values are read, from wherever they live (device or host tier).
    q (B, Hk, G, T, D), s_loc (B, Hk, G, T, L).
    """
    b, hk, _, _, d = q.shape
    bs, m = blocks.summary.size, mem.num_tokens
    n_sel = min(max(1, blocks.budget // bs), blocks.summary.num_blocks)
    chosen = _select_blocks(_flat(q), blocks, n_sel)  # (B, Hk, S)
    slots = (chosen[..., None] * bs + torch.arange(bs, device=chosen.device)).reshape(b, hk, n_sel * bs)
    inside = slots < m  # the short last block
    slots = slots.clamp(max=m - 1)  # (B, Hk, K)
    keys = _rows(mem.keys, slots).to(q.device, q.dtype)  # (B, Hk, K, D), from the device or the host tier
    vals = _rows(mem.values, slots).to(q.device, q.dtype)
    mask = torch.gather(mem.mask[:, :, :, 0].to(q.device).expand(b, hk, m), 2, slots)  # (B, Hk, K)
    if blocks.log_count is not None:  # a kept block's keys stand for its hidden copies too
        mask = mask + blocks.log_count.to(q.device)[chosen].repeat_interleave(bs, dim=-1)
        # With fewer kept blocks than n_sel, top-k also returns hidden ones: a copy's slots are visible in
        # the mask, so they are hidden here (its count is on the kept block already).
        kept = torch.gather(blocks.visible[:, None].expand(b, hk, -1), 2, chosen)  # (B, Hk, S)
        inside = inside & kept.to(inside.device).repeat_interleave(bs, dim=-1)
    mask = mask.masked_fill(~inside, MASK_MIN)[..., None]  # (B, Hk, K, 1): a mask per key/value head
    s_mem = _memory_scores(q, keys, mask, scale)  # (B, Hk, G, T, K)
    if topk is not None and topk < s_mem.shape[-1]:
        kth = torch.topk(s_mem, topk, dim=-1).values[..., -1:]  # (B, Hk, G, T, 1)
        s_mem = s_mem.masked_fill(s_mem < kth, min_score(s_mem.dtype))
    out, w_mem = _one_softmax(s_loc, v, s_mem, vals)  # w_mem (B, Hk, G, T, K)
    return out, (_mass_per_slot(slots, w_mem.sum(dim=(2, 3)), m) if want_weights else None)


def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                memory: MemCache | None = None, causal: bool = False) -> torch.Tensor:
    """torch's scaled_dot_product_attention over concat(local, memory) keys (config.torch_attention).

    Also the fast path for plain layers. mask: (B, 1, T, L) additive or None with causal=True.
    """
    hkv, h = k.shape[1], q.shape[1]
    memory = _on_device(memory, q.device)
    if memory is not None and memory.num_tokens:
        b, t = q.shape[0], q.shape[2]
        mem_k = memory.keys.to(k.dtype).expand(b, -1, -1, -1)
        mem_v = memory.values.to(v.dtype).expand(b, -1, -1, -1)
        mem_mask = memory.mask[:, :, :, 0].to(q.dtype).expand(b, 1, -1)[:, :, None].expand(b, 1, t, -1)
        if mask is None:
            mask = torch.full((t, k.shape[2]), float("-inf"), device=q.device, dtype=q.dtype).triu(1)
            mask = mask.expand(b, 1, t, -1)
        k, v = torch.cat([k, mem_k], dim=2), torch.cat([v, mem_v], dim=2)
        # Not clamped: finfo.min swamps any score, so fully masked rows stay uniform as in the reference.
        mask = torch.cat([mask.to(q.dtype), mem_mask], dim=-1)
        causal = False
    if mask is not None and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=h != hkv)
