"""Passkey retrieval probe (finetune/passkey.py): the reference prompt, sized in tokens, scored by generation.

Test Data: the recall fixture's tiny checkpoint and tokenizer (tests/fixtures/recall-tiny).
"""

import random
from pathlib import Path

import pytest

from finetune.passkey import FILLER, QUESTION, TASK, filler_chars_for, passkey_prompt, run_passkey

RECALL = Path(__file__).parent / "fixtures" / "recall-tiny"


def test_prompt_has_the_reference_parts_and_a_hidden_key():
    prompt, key = passkey_prompt(2000, random.Random(3))
    lines = prompt.split("\n")
    assert lines[0] == TASK and lines[-1] == QUESTION and len(lines) == 5
    assert lines[2] == f"The pass key is {key}. Remember it. {key} is the pass key."
    assert len(lines[1]) + len(lines[3]) == 2000 and 1 <= int(key) <= 50000
    assert set(" ".join(lines[1:4:2]).replace(FILLER, "").strip()) <= set(FILLER)  # only filler text
    assert passkey_prompt(2000, random.Random(3)) == (prompt, key)  # seeded: the same prompts every run


@pytest.mark.parametrize("target", [512, 4096])
def test_filler_is_sized_to_the_token_target(target):
    from longllama_lsp.model.loading import load_tokenizer

    tok = load_tokenizer(RECALL)
    prompt, _ = passkey_prompt(filler_chars_for(tok, target), random.Random(0))
    n = len(tok(prompt)["input_ids"])
    assert abs(n - target) <= 0.05 * target


def test_run_scores_generated_answers(one_thread):
    import torch

    from longllama_lsp.model.loading import load_model, load_tokenizer

    model, tok = load_model(RECALL, "cpu", torch.float32), load_tokenizer(RECALL)
    result = run_passkey(model, tok, 200, trials=2, max_new_tokens=4, progress=False)
    assert result.trials == 2 and len(result.answers) == 2 and len(result.prompt_tokens) == 2
    assert all(0 <= d <= 1 for d in result.depths)
    # Whatever the tiny model says, the score is exactly the trials whose answer holds the key.
    rng = random.Random("passkey-200-0")
    keys = [passkey_prompt(filler_chars_for(tok, 200), rng)[1] for _ in range(2)]
    assert result.correct == sum(k in a for k, a in zip(keys, result.answers, strict=True))
    assert result.to_dict()["accuracy"] == result.correct / 2
