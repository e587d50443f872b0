"""Fill-in-the-middle through the engine: what the decoder receives for a completion.

Test Data: a seeded tiny LongLLaMA sized to the stdlib BPE holding StarCoder's FIM tokens
(helpers_tokenizer.fim_tokenizer), and the tiny LongLLaMA with the real SmolLM2 tokenizer, which has
no FIM tokens (helpers_models).
"""

from __future__ import annotations

import pytest
from helpers_models import smol_tokenizer, smol_tokenizer_dir, tiny_model, tiny_model_dir  # noqa: F401
from helpers_tokenizer import fim_tokenizer

from longllama_lsp.engine import Engine, EngineOptions
from longllama_lsp.fim import detect_fim
from longllama_lsp.prompt import build_prompt

TEXT = "def area(r):\n    return 3.14 * r ** 2\n\n\nprint(area(2))\n"
CURSOR = TEXT.index("r ** 2")  # mid-line: text follows the cursor on its line


def prompts_sent(engine: Engine) -> list[list[int]]:
    """Record the prompt ids of every generation the engine's decoder runs (then run it)."""
    decoder, sent = engine.decoder, []
    generate = decoder.generate

    def recording(req, ids, *args, **kwargs):
        sent.append(list(ids))
        return generate(req, ids, *args, **kwargs)
    decoder.generate = recording
    return sent


@pytest.fixture(scope="module")
def fim_tok():
    return fim_tokenizer("starcoder")


@pytest.fixture
def fim_engine(fim_tok):
    from helpers_models import tiny_model_for

    eng = Engine(tiny_model_for(fim_tok), fim_tok, options=EngineOptions(max_tokens=8, memory=False, typeahead=False))
    yield eng
    eng.close()


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_a_mid_line_completion_sends_the_suffix_in_order(fim_engine, fim_tok):
    fim = detect_fim(fim_tok)
    sent = prompts_sent(fim_engine)
    done = fim_engine.complete(TEXT, CURSOR, path="/repo/area.py", mode="block")
    before = encode(fim_tok, TEXT[:CURSOR])
    assert fim_tok.decode(before[-1:]) == " "  # `* |r`: the space is healed (redone, forced), not sent
    assert sent == [[fim.prefix_id, *before[:-1], fim.suffix_id, *encode(fim_tok, TEXT[CURSOR:]), fim.middle_id]]
    assert done.mode == "block"  # the model sees the rest of the line: mid-line is no longer forced to one line
    assert fim_engine.status()["fim"] == "starcoder"
    assert set(fim.stop_ids) <= fim_engine.decoder._stop_ids()  # <|endoftext|>, <fim_pad>... end the middle


def test_fim_prompt_keeps_prefix_and_suffix_budgets_and_memory(fim_tok):
    """A long buffer: the window before the cursor and the suffix's first tokens are local, the rest memory."""
    from helpers_models import tiny_model_for

    long_text = "".join(f"value_{i} = compute({i})\n" for i in range(40))
    cursor = long_text.index("compute(20)")
    fim = detect_fim(fim_tok)
    eng = Engine(tiny_model_for(fim_tok), fim_tok, options=EngineOptions(max_tokens=8, typeahead=False))
    try:
        sent = prompts_sent(eng)
        done = eng.complete(long_text, cursor, path="/repo/values.py")
    finally:
        eng.close()
    ids = sent[0]
    context = 64  # the tiny model: min(last_context_length, window - max tokens)
    assert len(ids) <= context and ids[0] == fim.prefix_id and ids[-1] == fim.middle_id
    cut = ids.index(fim.suffix_id)
    prefix, suffix = ids[1:cut], ids[cut + 1:-1]
    assert len(suffix) == int((context - 3) * 0.25)  # Continue's share of the budget
    assert encode(fim_tok, long_text[cursor:])[:len(suffix)] == suffix  # the suffix's first tokens, in order
    # the window ends at the cursor, less the space after `=` (healed: redone by generation, forced)
    assert encode(fim_tok, long_text[:cursor])[:-1][-len(prefix):] == prefix
    assert done.memory_tokens > 0  # the text before the window and after the cursor stay in memory


def test_the_text_after_the_cursor_is_tokenized_once(fim_tok):
    """The FIM suffix is the start of the ids build_prompt cut into memory blocks, not a second tokenization."""
    from helpers_models import tiny_model_for

    class Counting:  # the tokenizer, recording the texts it is asked to tokenize
        def __init__(self, tokenizer):
            self.tokenizer, self.texts = tokenizer, []

        def __call__(self, text, *args, **kwargs):
            self.texts.append(text)
            return self.tokenizer(text, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

        def __len__(self):  # healing's forced tokens read the vocabulary's size (dunders skip __getattr__)
            return len(self.tokenizer)

    long_text = "".join(f"value_{i} = compute({i})\n" for i in range(40))
    cursor = long_text.index("compute(20)")
    counting = Counting(fim_tok)
    eng = Engine(tiny_model_for(fim_tok), counting, options=EngineOptions(max_tokens=8, typeahead=False))
    try:
        done = eng.complete(long_text, cursor, path="/repo/values.py")
    finally:
        eng.close()
    assert done.memory_tokens > 0  # the text after the cursor went to memory in blocks
    assert [t for t in counting.texts if t and long_text[cursor:].startswith(t)] == [long_text[cursor:]]


def test_typing_mid_line_reuses_the_prefix_and_prefills_the_suffix_again(fim_engine, fim_tok):
    first = fim_engine.complete(TEXT, CURSOR, path="/repo/area.py")
    # two tokens typed: healing redoes the last one (`r`), so the prefix sent grows by ` (`
    typed = TEXT[:CURSOR] + "(r" + TEXT[CURSOR:]
    second = fim_engine.complete(typed, CURSOR + 2, path="/repo/area.py")
    common = 0
    old, new = encode(fim_tok, TEXT[:CURSOR]), encode(fim_tok, typed[:CURSOR + 2])
    while common < min(len(old), len(new)) and old[common] == new[common]:
        common += 1
    assert first.reused_tokens == 0 and second.reused_tokens == 1 + common  # the prefix marker + the kept prefix
    assert second.timings["prefillTokens"] == second.prompt_tokens - second.reused_tokens
    fresh = fim_engine.complete(typed, CURSOR + 2, path="/repo/area.py", key="another document")
    assert fresh.reused_tokens == 0 and fresh.text == second.text and fresh.generated_tokens == second.generated_tokens


def test_without_fim_tokens_the_prompt_is_the_local_window_as_before(tiny_model, smol_tokenizer):  # noqa: F811
    """SmolLM2 has no FIM tokens: the window before the cursor alone, mid-line forced to line mode."""
    assert detect_fim(smol_tokenizer) is None
    eng = Engine(tiny_model, smol_tokenizer, options=EngineOptions(max_tokens=8, typeahead=False))
    try:
        sent = prompts_sent(eng)
        mid = eng.complete(TEXT, CURSOR, path="/repo/area.py", mode="block")
        end = eng.complete(TEXT, len(TEXT) - 1, path="/repo/area.py", mode="block")
        status = eng.status()
    finally:
        eng.close()
    # mid-line after `* ` the space is healed (redone by generation, forced), and at the end `))`: each
    # window less its last token
    assert sent == [build_prompt(smol_tokenizer, TEXT, CURSOR, 64).ids[:-1],
                    build_prompt(smol_tokenizer, TEXT, len(TEXT) - 1, 64).ids[:-1]]
    assert sent[0] == smol_tokenizer(TEXT[:CURSOR - 1], add_special_tokens=False)["input_ids"]
    assert mid.mode == "line" and end.mode == "block" and status["fim"] is None
