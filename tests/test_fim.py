"""Fill-in-the-middle templates and prompt assembly (longllama_lsp/fim.py), on real tokenizers.

Test Data: the byte-level BPE of helpers_tokenizer (trained on stdlib sources) with each family's FIM
tokens added as special tokens, as the StarCoder, Qwen2.5-Coder, CodeLlama and DeepSeek-Coder
tokenizers hold them.
"""

from __future__ import annotations

import pytest
from helpers_tokenizer import fim_tokenizer, stdlib_tokenizer, tokenizer_with

from longllama_lsp.fim import TEMPLATES, FimBudget, detect_fim, fim_prompt, split_fim_text

PREFIX = "def area(r):\n    return 3.14 * "
SUFFIX = " ** 2\n\n\nprint(area(2))\n"
BY_NAME = {t.name: t for t in TEMPLATES}


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name", list(BY_NAME))
def test_each_template_assembles_prefix_suffix_middle_exactly(name):
    tok = fim_tokenizer(name)
    t = BY_NAME[name]
    fim = detect_fim(tok, tok.bos_token_id)
    assert fim is not None and fim.template is t
    prompt = fim_prompt(fim, encode(tok, PREFIX), encode(tok, SUFFIX))
    bos = [tok.bos_token_id] if t.bos else []
    assert prompt.ids == [*bos, tok.convert_tokens_to_ids(t.prefix), *encode(tok, PREFIX),
                          tok.convert_tokens_to_ids(t.suffix), *encode(tok, SUFFIX), tok.convert_tokens_to_ids(t.middle)]
    assert tok.decode(prompt.ids) == f"{tok.bos_token if t.bos else ''}{t.prefix}{PREFIX}{t.suffix}{SUFFIX}{t.middle}"
    assert prompt.dropped_prefix == prompt.dropped_suffix == 0
    assert fim.stop_ids == tuple(tok.convert_tokens_to_ids(s) for s in t.stops)


def test_the_markers_of_each_family_are_what_its_tokenizer_calls_them():
    assert [(t.name, t.prefix, t.suffix, t.middle) for t in TEMPLATES] == [
        ("qwen2.5-coder", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
        ("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
        ("codellama", "▁<PRE>", "▁<SUF>", "▁<MID>"),
        ("deepseek-coder", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    ]


def test_without_a_full_set_of_fim_tokens_nothing_is_detected():
    assert detect_fim(tokenizer_with()) is None
    assert detect_fim(tokenizer_with("<fim_prefix>", "<fim_middle>")) is None  # no suffix marker
    assert detect_fim(stdlib_tokenizer()) is None  # a bare tokenizers.Tokenizer has get_vocab too


def test_budget_keeps_the_end_of_the_prefix_and_the_start_of_the_suffix():
    tok = fim_tokenizer("starcoder")
    fim = detect_fim(tok)
    prefix, suffix = list(range(1000, 1100)), list(range(2000, 2100))
    prompt = fim_prompt(fim, prefix, suffix, FimBudget(max_prompt_tokens=43, max_suffix_share=0.25))
    # 43 - 3 markers = 40 usable: suffix int(40 * 0.25) = 10 (its first), prefix the other 30 (its last)
    assert prompt.ids == [fim.prefix_id, *prefix[70:], fim.suffix_id, *suffix[:10], fim.middle_id]
    assert (prompt.prefix_tokens, prompt.suffix_tokens, prompt.dropped_prefix, prompt.dropped_suffix) == (30, 10, 70, 90)


def test_a_short_suffix_leaves_its_share_to_the_prefix():
    fim = detect_fim(fim_tokenizer("qwen2.5-coder"))
    prompt = fim_prompt(fim, list(range(1000, 1100)), [7, 8], FimBudget(max_prompt_tokens=43))
    assert prompt.prefix_tokens == 38 and prompt.suffix_tokens == 2 and len(prompt.ids) == 43


def test_bos_counts_against_the_budget_and_a_budget_without_room_is_refused():
    tok = fim_tokenizer("codellama")
    fim = detect_fim(tok, tok.bos_token_id)
    assert fim.special_tokens == 4
    assert len(fim_prompt(fim, list(range(500, 600)), [], FimBudget(max_prompt_tokens=20)).ids) == 20
    with pytest.raises(ValueError, match="no room"):
        fim_prompt(fim, [1], [2], FimBudget(max_prompt_tokens=4))
    with pytest.raises(ValueError, match="invalid FIM budget"):
        FimBudget(max_suffix_share=1.5)


# Prompts as clients wrap them (Continue's autocomplete templates, llm.nvim's fim = {prefix, suffix, middle}).
CLIENT_TEMPLATES = {
    "qwen2.5-coder": "<|fim_prefix|>{p}<|fim_suffix|>{s}<|fim_middle|>",
    "starcoder": "<fim_prefix>{p}<fim_suffix>{s}<fim_middle>",
    "codellama": "<PRE> {p} <SUF>{s} <MID>",
    "deepseek-coder": "<｜fim▁begin｜>{p}<｜fim▁hole｜>{s}<｜fim▁end｜>",
}


def client_prompt(name: str, prefix: str = PREFIX, suffix: str = SUFFIX) -> str:
    return CLIENT_TEMPLATES[name].format(p=prefix, s=suffix)


@pytest.mark.parametrize("name", list(BY_NAME))
def test_a_prompt_the_client_wrapped_splits_back_into_prefix_and_suffix(name):
    found = split_fim_text(client_prompt(name))
    assert (found.template, found.prefix, found.suffix) == (name, PREFIX, SUFFIX)


def test_split_drops_the_clients_context_and_keeps_a_begun_middle():
    repo_level = f"<|repo_name|>demo\n<|file_sep|>a.py\nX = 1\n<|file_sep|>b.py\n{client_prompt('qwen2.5-coder')}"
    found = split_fim_text(repo_level + "pi")
    assert (found.prefix, found.suffix) == (PREFIX + "pi", SUFFIX)
    assert split_fim_text(PREFIX) is None and split_fim_text(f"<fim_prefix>{PREFIX}<fim_middle>") is None
    assert split_fim_text("<fim_prefix>a<fim_middle>b<fim_suffix>c") is None  # not prefix-suffix-middle
