"""longllama_lsp.repetition: loops end an answer, ordinary repetition in code does not.

Test Data: the looping answer quoted in issue 19 (tokenized with the real SmolLM2 tokenizer) and
stdlib source files, which repeat short lines and identifiers but never loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_models import smol_tokenizer, smol_tokenizer_dir  # noqa: F401

from longllama_lsp.repetition import RepetitionGuard, loop_in_tail, repeated_line_end

STDLIB = Path(json.__file__).parent.parent
SENTENCE = "Frozen classes in attrs are implemented by overriding __setattr__ to raise an error. "


def test_a_repeated_sentence_is_cut_after_its_first_copy(smol_tokenizer_dir):  # noqa: F811
    from longllama_lsp.model.loading import load_tokenizer

    tok = load_tokenizer(smol_tokenizer_dir)
    prefix = tok.encode("The answer: ", add_special_tokens=False)
    one = tok.encode(SENTENCE, add_special_tokens=False)
    ids = prefix + one * 4
    keep = RepetitionGuard().check(ids)
    assert keep is not None
    assert tok.decode(ids[:keep]).startswith("The answer: " + SENTENCE.strip())
    assert keep <= len(prefix) + len(one) + 1  # one copy (BPE may merge the joint differently)


def test_every_prefix_of_a_loop_is_caught_as_soon_as_it_spans_enough():
    block = list(range(100, 120))  # a 20-token sentence
    ids = [1, 2, 3] + block * 5
    first = next(n for n in range(1, len(ids) + 1) if loop_in_tail(ids[:n]) is not None)
    assert first == 3 + 3 * 20  # three copies (60 tokens >= min_span 48): caught at the end of the third
    assert loop_in_tail(ids[:first]) == 3 + 20


def test_short_periodic_data_is_not_a_loop_until_it_is_long():
    zeros = [15, 11] * 20  # "0, " x 20 = 40 tokens: a data table, not yet a loop
    assert loop_in_tail([7] + zeros) is None
    assert loop_in_tail([7] + zeros + [15, 11] * 5) == 3  # 50 tokens of one 2-token block


@pytest.mark.parametrize("name", ["json/decoder.py", "email/_header_value_parser.py", "argparse.py"])
def test_real_source_never_looks_like_a_loop(name, smol_tokenizer_dir):  # noqa: F811
    from longllama_lsp.model.loading import load_tokenizer

    text = (STDLIB / name).read_text()
    assert repeated_line_end(text) is None
    ids = load_tokenizer(smol_tokenizer_dir).encode(text[:20000], add_special_tokens=False)
    hits = [n for n in range(60, len(ids), 7) if loop_in_tail(ids[:n]) is not None]
    assert hits == []


def test_a_line_repeated_three_times_in_a_row_is_cut():
    text = "def f():\n    return compute_the_thing(x)\n\n    return compute_the_thing(x)\n" \
           "    return compute_the_thing(x)\n    return"
    end = repeated_line_end(text)
    assert text[:end] == "def f():\n    return compute_the_thing(x)\n"
    assert RepetitionGuard().cut_text(text) == text[:end]


def test_short_or_scattered_repeats_and_unfinished_lines_do_not_count():
    assert repeated_line_end("}\n}\n}\n}\n") is None  # too short to mean anything
    scattered = "    return None  # a\nx = 1\n    return None  # a\ny = 2\n    return None  # a\n"
    assert repeated_line_end(scattered) is None
    assert repeated_line_end("a long line here\n" * 2 + "a long line here") is None  # third one unfinished


# -- through the engine: the decode loop ends answers and completions caught in a loop -----------------

def _engine(model, tokenizer, **options):
    from longllama_lsp.engine import Engine, EngineOptions

    return Engine(model, tokenizer, options=EngineOptions(memory=False, typeahead=False, **options))


def test_an_answer_that_repeats_a_line_ends_after_its_first_copy(smol_tokenizer):  # noqa: F811
    from helpers_models import looping_model

    line = "result = compute(value)\n"
    cycle = smol_tokenizer(line, add_special_tokens=False)["input_ids"]
    engine = _engine(looping_model(smol_tokenizer, cycle), smol_tokenizer, answer_max_tokens=60)
    try:
        streamed: list[str] = []
        answer = engine.answer("Why?", on_token=streamed.append)
    finally:
        engine.close()
    assert "".join(streamed) == line.strip()  # the copies before the loop was spotted were held back, never shown
    assert answer.stop_reason == "repetition" and answer.text == line.strip()
    assert answer.generated_tokens == len(cycle)


def test_a_completion_caught_in_a_token_loop_ends_after_its_first_copy(smol_tokenizer):  # noqa: F811
    from helpers_models import looping_model

    text = "def main():\n    names ="
    cycle = smol_tokenizer(" alpha beta gamma", add_special_tokens=False)["input_ids"]
    engine = _engine(looping_model(smol_tokenizer, cycle), smol_tokenizer, max_tokens=60)
    try:
        done = engine.complete(text, len(text), path="/repo/m.py")  # line mode: no line break ever comes
    finally:
        engine.close()
    assert done.stop_reason == "repetition" and done.text == " alpha beta gamma"
    assert done.generated_tokens == 1 + len(cycle)  # the healed " =" (redone, forced), then one copy


def test_an_answer_that_repeats_a_paragraph_ends_after_its_first_copy(smol_tokenizer):  # noqa: F811
    """A loop longer than a line (SmolLM2's `ask` repeated an 81-token paragraph): two copies end it."""
    from helpers_models import looping_model

    words = [t for t in range(1000, 1200) if "\n" not in smol_tokenizer.decode([t])][:90]
    model = looping_model(smol_tokenizer, words, hidden_size=128, max_position_embeddings=512,
                          last_context_length=256)
    engine = _engine(model, smol_tokenizer, answer_max_tokens=250)
    try:
        answer = engine.answer("Why?")
    finally:
        engine.close()
    assert answer.stop_reason == "repetition" and answer.generated_tokens == len(words)
    assert answer.text == smol_tokenizer.decode(words).strip()


def _stream(tok, ids, guard):
    """Decode.py's order per token (stream it, then check for a loop: the token check, and the line
    check when the token holds a line break; Decoder._loop_end) through the answer stream:
    (text the reader saw, final answer text)."""
    from longllama_lsp.engine import _Stream

    seen: list[str] = []
    stream, generated = _Stream(tok, seen.append, guard), []
    for t in ids:
        generated.append(t)
        stream(t, generated)
        keep = None if guard is None else guard.check(generated)
        if keep is None and guard is not None and "\n" in tok.decode([t]):
            cut = guard.cut_text(tok.decode(generated))
            keep = None if cut is None else next(k for k in range(1, len(generated) + 1)
                                                 if len(tok.decode(generated[:k])) >= len(cut))
        if keep is not None:
            del generated[keep:]
            break
    answer = stream.flush(generated)
    return "".join(seen), answer


def test_a_streamed_answer_never_shows_the_loop_it_is_cut_at(smol_tokenizer_dir):  # noqa: F811
    from longllama_lsp.engine import EngineOptions
    from longllama_lsp.model.loading import load_tokenizer

    tok = load_tokenizer(smol_tokenizer_dir)
    guard = EngineOptions().answer_repetition
    ids = tok.encode("The answer: " + SENTENCE * 6, add_special_tokens=False)
    seen, answer = _stream(tok, ids, guard)
    assert answer.count(SENTENCE.strip()) == 1
    assert seen == answer.rstrip()  # `longllama ask` used to print the loop's copies before the cut
    unguarded, _ = _stream(tok, ids, None)
    assert unguarded.count(SENTENCE.strip()) == 6


@pytest.mark.parametrize("name", ["json/__init__.py", "argparse.py"])
def test_ordinary_text_streams_whole_and_barely_late(name, smol_tokenizer_dir):  # noqa: F811
    from longllama_lsp.model.loading import load_tokenizer

    tok = load_tokenizer(smol_tokenizer_dir)
    guard = RepetitionGuard(min_repeats=2, max_period=160, min_span=64)
    text = (STDLIB / name).read_text()[:6000]
    ids = tok.encode(text, add_special_tokens=False)
    seen, answer = _stream(tok, ids, guard)
    assert seen == answer.rstrip() == tok.decode(ids).rstrip()
    lags = [guard.held(ids[:n]) for n in range(1, len(ids))]
    assert sum(lags) / len(lags) < 2 and max(lags) <= 24  # tokens held back: shown a step or a line late


NUMBERED_LOOP = """The repository contains a variety of settings. Here are the settings in detail:

1. **Appearance**: This is the default setting. It is used to display the user's profile picture.

2. **Banners**: This is the setting that is used to display the user's profile picture. It is also used to display the user's name.

3. **Browsers**: This is the setting that is used to display the user's browser. It is also used to display the user's name.

4. **Browsers**: This is the setting that is used to display the user's browser. It is also used to display the user's name.

5. **Browsers**: This is the setting that is used to display the user's browser. It is also used to display the user's name.

6. **Browsers**: This is the setting that is used to display the user's browser. It is also used to display the user's name.
"""  # the first six of nine items `longllama ask` gave on the shipped default (2026-12-05, 300-token limit)


def test_an_answer_in_a_numbered_loop_ends_after_its_first_copy():
    from longllama_lsp.engine import EngineOptions

    guard = EngineOptions().answer_repetition
    cut = guard.cut_text(NUMBERED_LOOP)
    assert cut is not None and cut.rstrip().endswith("name.") and "3. **Browsers**" in cut and "4." not in cut
    assert RepetitionGuard(min_repeats=2).cut_text(NUMBERED_LOOP) is None  # exact copies only: missed


def test_a_streamed_numbered_loop_is_never_shown(smol_tokenizer_dir):  # noqa: F811
    from longllama_lsp.engine import EngineOptions
    from longllama_lsp.model.loading import load_tokenizer

    tok = load_tokenizer(smol_tokenizer_dir)
    seen, answer = _stream(tok, tok.encode(NUMBERED_LOOP, add_special_tokens=False), EngineOptions().answer_repetition)
    assert answer.rstrip().endswith("3. **Browsers**: This is the setting that is used to display the user's browser. "
                                    "It is also used to display the user's name.")
    assert seen == answer.rstrip()  # neither "4. ..." nor the "5" of the next copy was shown, nor blank lines


def test_numbered_lines_of_an_ordinary_answer_are_not_a_loop():
    from longllama_lsp.engine import EngineOptions

    guard = EngineOptions().answer_repetition
    steps = "1. Install the package with pip.\n2. Run the tests with pytest.\n3. Build the docs with make.\n"
    table = "\n".join(f"    assert add({i}, {i + 1}) == {2 * i + 1}" for i in range(5)) + "\n"
    code = "\n".join(f"    x[{i}] = a" for i in range(5)) + "\n"
    assert [guard.cut_text(t) for t in (steps, table, code)] == [None, None, None]
