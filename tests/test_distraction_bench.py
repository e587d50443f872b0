"""Helpers of the distraction benchmark (finetune/distraction.py, bench/bench_distraction.py).

Test Data: a whitespace "tokenizer" defined here, and a random PRESETS["tiny"] LongLLaMA.
"""

from __future__ import annotations

import collections

import pytest
import torch

from finetune.distraction import (
    RemappedTokenizer,
    chunk_windows,
    count_tokens,
    distractor_plan,
    stack_rows,
    window_nll,
)


class WordTokenizer:
    """Test Data: ids = position of a word in a fixed list; 0 bos, 1 eos, 2 pad."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2
    words = ["<s>", "</s>", "<pad>", "def", "x", "return", "y", "rare"]

    def encode(self, text, add_special_tokens=False):
        return [self.words.index(w) for w in text.split()]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


def test_remapped_tokenizer_keeps_specials_and_frequent_ids():
    base = WordTokenizer()
    counts = count_tokens(base, ["def x return x", "x y x"])
    tok = RemappedTokenizer.from_counts(base, counts, k=5)  # <unk> + 3 specials + 1 frequent ("x")
    assert len(tok) == 5 and tok.unk_token_id == 0
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)
    assert tok.encode("x def rare x") == [4, 0, 0, 4]
    assert tok.decode(tok.encode("x rare x")) == "x x"
    assert counts == collections.Counter({4: 4, 3: 1, 5: 1, 6: 1})


def test_chunk_windows_need_a_full_previous_chunk():
    docs = [list(range(10)), list(range(3)), list(range(8))]
    assert chunk_windows(docs, 4) == [(0, 1), (2, 1)]


def test_distractor_plan_is_seeded_distinct_and_excludes():
    a = distractor_plan(5, 10, 4, seed=1, exclude=[3, None, 3, 3, 3])
    assert a == distractor_plan(5, 10, 4, seed=1, exclude=[3, None, 3, 3, 3])
    assert a != distractor_plan(5, 10, 4, seed=2, exclude=[3, None, 3, 3, 3])
    assert all(len(set(p)) == 4 and (w == 1 or 3 not in p) for w, p in enumerate(a))
    with pytest.raises(ValueError):
        distractor_plan(1, 3, 4, seed=0)


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """Tiny tensors only (conftest's one_thread)."""
    yield


@pytest.fixture(scope="module")
def tiny():
    from longllama_lsp.model import PRESETS, LongLlamaConfig, LongLlamaForCausalLM

    torch.manual_seed(0)
    return LongLlamaForCausalLM(LongLlamaConfig(**PRESETS["tiny"])).eval()


def test_stacked_padded_memory_scores_like_each_row_alone(tiny):
    from longllama_lsp.model import Memory

    torch.manual_seed(1)
    chunks = [torch.randint(3, 99, (1, n)) for n in (8, 5, 8)]
    mems = [tiny.encode_memory(c) for c in chunks]
    rows = [mems[0], Memory.concat([mems[1], mems[2]]), mems[1]]  # 8, 13, 5 memory tokens
    windows = torch.randint(3, 99, (3, 12))
    together = window_nll(tiny, windows, stack_rows(rows))
    alone = torch.cat([window_nll(tiny, windows[i:i + 1], rows[i]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-4)
    none = window_nll(tiny, windows, None)
    assert not torch.allclose(none, alone, atol=1e-3)  # memory changes the scores


def test_window_nll_matches_the_eval_module(tiny):
    from finetune.evaluate import score_windows

    windows = torch.randint(3, 99, (4, 10))
    total, count = score_windows(tiny, windows.tolist(), lambda idx: None, batch_size=2)
    assert count == 4 * 9
    assert float(window_nll(tiny, windows).sum()) == pytest.approx(total, rel=1e-5)
