"""bench/knn_gate.py: the flip table and the offline weights, which decided that the lookup keeps a constant weight."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import knn_gate  # noqa: E402

from longllama_lsp.knn import mixture  # noqa: E402


def _case(seed: int = 0, positions: int = 40, vocab: int = 50):
    """Model log-probs (T, V), a lookup's mixture at 0.3 over random neighbours, targets and masks."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(positions, vocab, generator=g) * 3, -1)
    dist = torch.rand(positions, 16, generator=g).sort(-1).values + 0.1  # nearest first
    ids = torch.randint(0, vocab, (positions, 16), generator=g)
    mixed = mixture(logp, dist, ids, 0.3, 0.25)
    target = torch.where(torch.rand(positions, generator=g) < 0.5, logp.argmax(-1), mixed.argmax(-1))
    masks = {"all": torch.ones(positions, dtype=torch.bool), "xid": torch.arange(positions) % 3 == 0,
             "first": torch.arange(positions) % 6 == 0}
    return logp, mixed, target, masks


def test_flips_are_counted_by_the_models_confidence():
    logp, mixed, target, masks = _case()
    flips = knn_gate.Flips()
    flips.add(logp, mixed, target, masks)
    changed = logp.argmax(-1) != mixed.argmax(-1)
    rows = flips.rows["all"]
    assert sum(r[0] for r in rows) == len(target)
    assert sum(r[1] + r[2] + r[3] for r in rows) == int(changed.sum()) > 0
    assert sum(r[1] for r in rows) == int((changed & (mixed.argmax(-1) == target)).sum())
    assert sum(r[2] for r in rows) == int((changed & (logp.argmax(-1) == target)).sum())


def test_offline_weights_reproduce_the_mixture_they_were_saved_from():
    """The vote is recovered from the 0.3 mixture; the shipped row must score exactly as the mixture did, and
    weight 0 as the model alone."""
    logp, mixed, target, masks = _case(seed=1)
    saved = [knn_gate._positions(logp, mixed, target, masks)]
    table = knn_gate.weights_table(saved)
    shipped = int((mixed.argmax(-1) == target).sum())
    alone = int((logp.argmax(-1) == target).sum())
    assert f"0.3 (shipped)          all {shipped} (+0)" in table
    assert f"0.0                    all {alone} ({alone - shipped:+d})" in table
