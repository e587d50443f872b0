"""Cross-batch attention (longllama_lsp/model/crossbatch.py) against a row-by-row reference.

Test Data: random fp64 tensors; one-hot values that reveal which (row, token) each query reads.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from longllama_lsp.model.crossbatch import CrossBatch, crossbatch_attention, visible_contexts


def reference_pack_sizes(batch, cross_batch_range, pack, stepping):
    """Literal transcription of the pack_size loop in FoT/cross_batch.py (L135-157)."""
    num_attentions = 1 + cross_batch_range
    step = -(-num_attentions // max(pack - 1, 1))
    sizes = []
    for i in range(batch):
        if pack == 1 or not stepping:
            size = num_attentions
        else:
            size = min((i % pack) * step + 1, num_attentions)
        sizes.append(min(size, i + 1))
    return sizes


def naive_crossbatch(q, k_local, k_mem, v, visible, local_mask=None):
    """Row by row: keys [own rotated (causal); unrotated rows b-1 .. b-n+1], one softmax."""
    bsz, heads, t, d = q.shape
    rep = heads // k_local.shape[1]
    out = []
    for b in range(bsz):
        n = int(visible[b])
        keys = torch.cat([k_local[b]] + [k_mem[b - c] for c in range(1, n)], dim=1)  # (Hkv, n·T, D)
        vals = torch.cat([v[b - c] for c in range(n)], dim=1)
        keys, vals = keys.repeat_interleave(rep, 0), vals.repeat_interleave(rep, 0)  # (H, n·T, D)
        scores = q[b] @ keys.transpose(-1, -2) / math.sqrt(d)  # (H, T, n·T)
        bias = torch.zeros(t, n * t, dtype=q.dtype)
        if local_mask is None:
            bias[:, :t] = torch.full((t, t), float("-inf"), dtype=q.dtype).triu(1)
        else:
            bias[:, :t] = local_mask[b, 0]
        out.append((scores + bias).softmax(-1) @ vals)
    return torch.stack(out)


def random_inputs(bsz=8, heads=4, kv_heads=2, t=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(bsz, heads, t, d)] + [(bsz, kv_heads, t, d)] * 3
    return [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]


def test_readme_stepping_example():
    # FoT/README "Cross-batch stepping": B=8, R=6, doc_aware_k4 -> ranges 0,1,2,3,0,3,6,6 (with stepping)
    extra = visible_contexts(8, 6, 4, stepping=True) - 1
    assert extra.tolist() == [0, 1, 2, 3, 0, 3, 6, 6]
    # without stepping the same flags give the plain capped range instead
    assert (visible_contexts(8, 6, 4, stepping=False) - 1).tolist() == [0, 1, 2, 3, 4, 5, 6, 6]


def test_longllama_3b_setting():
    # doc_aware_k4, R=3, stepping -> (positives, negatives) (0,0) (1,1) (2,1) (3,0) per pack
    vis = CrossBatch(range=3, pack=4).visible(8)
    assert vis.tolist() == [1, 2, 3, 4, 1, 3, 4, 4]  # first pack capped at b+1 (no wrap-around)
    pos_neg = [(min(j, n - 1), n - 1 - min(j, n - 1)) for j, n in enumerate(vis[4:].tolist())]
    assert pos_neg == [(0, 0), (1, 1), (2, 1), (3, 0)]


def test_paper_7b_setting_not_produced_by_stepping():
    # spec §3.2: ¼(0,0) ¼(1,2) ¼(2,5) ¼(3,4) = visible 1,4,8,8 is out of reach of the stepping formula
    reachable = {tuple(visible_contexts(8, r, 4, True)[4:].tolist()) for r in range(64)}
    assert (1, 4, 8, 8) not in reachable


@given(st.integers(1, 6), st.integers(0, 9), st.integers(1, 5), st.booleans())
def test_visible_matches_reference_loop(packs, cross_batch_range, pack, stepping):
    got = visible_contexts(packs * pack, cross_batch_range, pack, stepping).tolist()
    assert got == reference_pack_sizes(packs * pack, cross_batch_range, pack, stepping)


@pytest.mark.parametrize("cb", [CrossBatch(3, 4), CrossBatch(6, 4), CrossBatch(2, 2, stepping=False),
                                CrossBatch(1, 1), CrossBatch(0, 4)])
def test_matches_naive_forward_and_grads(cb):
    inputs = random_inputs()
    visible = cb.visible(8)
    got = crossbatch_attention(*inputs, visible)
    grads = torch.autograd.grad(got.pow(2).sum(), inputs, materialize_grads=True)
    want = naive_crossbatch(*inputs, visible)
    want_grads = torch.autograd.grad(want.pow(2).sum(), inputs, materialize_grads=True)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)


def test_local_mask_replaces_causal_on_own_row_only():
    inputs = random_inputs(heads=2, kv_heads=2)
    mask = torch.full((5, 5), float("-inf"), dtype=torch.float64).triu(1).expand(8, 1, 5, 5).clone()
    mask[:, :, :, 0] = -1e9  # first token of every row is padding for its own row's queries
    visible = CrossBatch(3, 4).visible(8)
    got = crossbatch_attention(*inputs, visible, local_mask=mask)
    torch.testing.assert_close(got, naive_crossbatch(*inputs, visible, local_mask=mask), atol=1e-10, rtol=0)


def test_one_hot_values_show_exactly_which_tokens_are_read():
    bsz, t = 8, 3
    q, k_local, k_mem, _ = random_inputs(bsz=bsz, heads=2, kv_heads=1, t=t, d=bsz * t)
    v = torch.eye(bsz * t, dtype=torch.float64).reshape(bsz, 1, t, bsz * t)  # value of (row b, token s)
    out = crossbatch_attention(q, k_local, k_mem, v, CrossBatch(3, 4).visible(bsz))
    read = (out.abs() > 0).reshape(bsz, 2, t, bsz, t)  # [b, h, s, row, token]
    rows_read = {b: sorted({r for r in range(bsz) if read[b, :, :, r].any()}) for b in range(bsz)}
    assert rows_read == {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3],
                         4: [4], 5: [3, 4, 5], 6: [3, 4, 5, 6], 7: [4, 5, 6, 7]}
    for b, rows in rows_read.items():
        for s in range(t):
            own = read[b, :, s, b].any(0).tolist()
            assert own == [j <= s for j in range(t)]  # causal inside the own row
            for r in rows[:-1]:
                assert read[b, :, s, r].all()  # other rows fully visible, even to the first query


def test_gradients_reach_positive_and_negative_rows():
    q, k_local, k_mem, v = random_inputs()
    out = crossbatch_attention(q, k_local, k_mem, v, CrossBatch(3, 4).visible(8))
    out[5].sum().backward()  # row 5 = pack row 1: positive row 4 (same doc), negative row 3
    nonzero = lambda g: [b for b in range(8) if g[b].abs().sum() > 0]  # noqa: E731
    assert nonzero(k_mem.grad) == [3, 4]
    assert nonzero(v.grad) == [3, 4, 5]
    assert nonzero(k_local.grad) == [5]
    assert nonzero(q.grad) == [5]


def test_validation_errors():
    q, k_local, k_mem, v = random_inputs()
    with pytest.raises(ValueError, match="visible"):
        crossbatch_attention(q, k_local, k_mem, v, torch.full((8,), 2))  # row 0 would wrap around
    with pytest.raises(ValueError, match="k_mem"):
        crossbatch_attention(q, k_local, k_mem[:, :, :4], v, torch.ones(8, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        visible_contexts(6, 3, 4, True)
    with pytest.raises(ValueError):
        CrossBatch(range=-1)


def test_bf16_and_fp32_close_to_fp64():
    inputs = [x.detach() for x in random_inputs(t=16, d=16)]
    visible = CrossBatch(3, 4).visible(8)
    want = crossbatch_attention(*inputs, visible)
    got = crossbatch_attention(*[x.float() for x in inputs], visible)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_tiny_model_rows_read_exactly_the_visible_rows():
    """Through LongLlamaForCausalLM: changing one row's tokens changes only the rows that see it."""
    from longllama_lsp.model import PRESETS, LongLlamaConfig, LongLlamaForCausalLM

    torch.manual_seed(0)
    model = LongLlamaForCausalLM(LongLlamaConfig(**PRESETS["tiny"])).eval()
    x = torch.randint(3, 99, (8, 12))
    cb = CrossBatch(3, 4)
    with torch.no_grad():
        base = model(x, crossbatch=cb).logits
        torch.testing.assert_close(model(x, crossbatch=CrossBatch(0, 4)).logits, model(x).logits)
        for row, readers in ((3, [3, 5, 6]), (6, [6, 7])):  # visible: row 5 {3,4,5}, 6 {3..6}, 7 {4..7}
            y = x.clone()
            y[row] = (y[row] + 1) % 99
            changed = (model(y, crossbatch=cb).logits - base).abs().amax((1, 2)) > 0
            assert changed.nonzero().flatten().tolist() == readers


def test_data_args_crossbatch_at_schedule():
    from finetune.config import DataArgs

    args = DataArgs(pack=4, cross_batch_range=2, d_schedule=[(500, 3), (0, 1)])
    assert [args.crossbatch_at(s) for s in (0, 500)] == [CrossBatch(1, 4), CrossBatch(3, 4)]
