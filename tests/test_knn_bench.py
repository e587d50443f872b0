"""bench/knn/states.py: the kNN-LM lookup that bench/knn/sitecustomize.py puts into the server's decode steps."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "knn"))
import states as S  # noqa: E402

from longllama_lsp.knn import mixture  # noqa: E402


def _store() -> S.Datastore:
    keys = {"a.py": torch.tensor([[0.0, 0.0], [5.0, 5.0]]), "b.py": torch.tensor([[1.0, 0.0], [9.0, 9.0]])}
    nxt = {"a.py": torch.tensor([3, 4]), "b.py": torch.tensor([6, 7])}
    return S.Datastore({p: (keys[p].half(), nxt[p]) for p in keys})


def test_the_completed_files_own_states_are_never_neighbours():
    ds = _store()
    q = torch.tensor([[0.0, 0.0]])  # exactly a.py's first state
    _, rows = ds.nearest(q, ds.others("b.py"), 1)
    assert ds.next_ids[rows].tolist() == [[3]]
    _, rows = ds.nearest(q, ds.others("a.py"), 2)
    assert ds.next_ids[rows].tolist() == [[6, 7]]  # b.py's, nearest first


def test_a_chunks_rows_are_the_states_at_its_tokens():
    ds = _store()
    rows = ds.chunks([("r", "b.py", 1)], 4)  # b.py's tokens from its second on: one row left
    assert ds.next_ids[rows].tolist() == [7]
    assert ds.next_ids[ds.chunks([("r", "a.py", 0), ("r", "b.py", 0)], 1)].tolist() == [3, 6]


def test_the_mixture_is_a_distribution_that_moves_toward_the_neighbours_tokens():
    logp = torch.log_softmax(torch.randn(2, 10, generator=torch.Generator().manual_seed(0)), -1)
    dist = torch.tensor([[1.0, 4.0], [2.0, 2.0]])
    nxt = torch.tensor([[3, 5], [7, 7]])
    assert torch.allclose(mixture(logp, dist, nxt, 0.0, 0.5), logp, atol=1e-6)
    mixed = mixture(logp, dist, nxt, 0.3, 0.5)
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(2), atol=1e-5)
    assert mixed[0, 3] > logp[0, 3] and mixed[0, 3] - logp[0, 3] > mixed[0, 5] - logp[0, 5]  # nearer votes more
    assert mixed[1, 7] > logp[1, 7] and mixed[1, 0] < logp[1, 0]
    only = mixture(logp, dist[1:], nxt[1:], 1.0, 0.5)
    assert only[0].argmax() == 7 and float(only[0, 7].exp()) > 0.999


def test_file_states_are_each_positions_state_with_context_before_it(tiny_model):
    probe = S.StateProbe(tiny_model)
    ids = torch.randint(1, 99, (700,), generator=torch.Generator().manual_seed(1)).tolist()
    got = S.file_states(tiny_model, probe, ids)
    assert got.shape == (699, tiny_model.config.hidden_size)
    with torch.no_grad():  # position 600 (second window: ids[256:700]) as a forward over that window gives it
        tiny_model(torch.tensor([ids[256:700]]), use_cache=False, last_context_length=444)
    assert torch.allclose(got[600], probe.states[0, 600 - 256], atol=1e-5)
    with torch.no_grad():
        tiny_model(torch.tensor([ids[:512]]), use_cache=False, last_context_length=512)
    assert torch.allclose(got[:511], probe.states[0, :511], atol=1e-5)
