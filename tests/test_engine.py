"""The engine and the prompt functions, called directly (no server).

Test Data: a seeded tiny LongLLaMA with the SmolLM2 tokenizer (tests/helpers_models.py); a
MemoryBank filled from two small files written to tmp_path.
"""

from __future__ import annotations

import random
import threading
from types import SimpleNamespace

import pytest
import torch
from helpers_indexer import ChunkMeta
from helpers_models import (  # noqa: F401
    looping_model,
    smol_tokenizer,
    smol_tokenizer_dir,
    tiny_model,
    tiny_model_dir,
)

from longllama_lsp.engine import HEALED_WHITESPACE_TOKENS, Cancelled, Completion, Engine, EngineOptions
from longllama_lsp.prompt import (
    StopRule,
    SyntaxBlock,
    build_prompt,
    finish,
    trim_overlap,
    window_start,
    word_before,
)

ATOL = 1e-4


CODE = '''import os


def greet(name):
    """Say hello."""
    print("hello", name)


class Greeter:
    def __init__(self, prefix):
        self.prefix = prefix

    def greet(self, name):
        return self.prefix + name


def main():
    g = Greeter("hi ")
    greet(g.greet("world"))
'''


@pytest.fixture
def engine(tiny_model, smol_tokenizer):  # noqa: F811
    eng = Engine(tiny_model, smol_tokenizer, options=EngineOptions(max_tokens=8, answer_max_tokens=8))
    yield eng
    eng.close()


# -- prompt.py (pure) ------------------------------------------------------------------------------------

def test_window_start_moves_in_strides():
    assert window_start(10, 64, 16) == 0
    assert window_start(65, 64, 16) == 16
    assert window_start(80, 64, 16) == 16  # typing 15 more tokens keeps k: the local cache stays valid
    assert window_start(81, 64, 16) == 32


def test_build_prompt_splits_window_and_memory_blocks(smol_tokenizer):  # noqa: F811
    text = CODE * 3
    offset = text.index("class Greeter", len(CODE) * 2)
    p = build_prompt(smol_tokenizer, text, offset, context_tokens=64, stride=16)
    head_ids = smol_tokenizer(text[:offset], add_special_tokens=False)["input_ids"]
    assert p.window_start % 16 == 0 and len(p.ids) <= 64
    assert [t for b in p.before for t in b.ids] + p.ids == head_ids
    assert p.before[0].start_line == 1 and all(b.start_line <= b.end_line for b in p.before)
    assert p.suffix == text[offset:] and p.after[0].start_line == text[:offset].count("\n") + 1
    assert p.line_prefix == ""
    typed = build_prompt(smol_tokenizer, text[:offset] + "cl" + text[offset:], offset + 2, 64, 16)
    assert typed.window_start == p.window_start and [b.key for b in typed.after] == [b.key for b in p.after]


@pytest.mark.parametrize("mode, prefix, suffix, generated, expected, done", [
    ("line", "x = ", "\n", "foo(1)\nbar", "foo(1)", True),
    ("line", "x = ", "\n", "foo(1", "foo(1", False),
    ("line", "def f(x):", "\n", "\n    return x\n", "\n    return x", True),  # next line after a full line
    ("line", "    ", "\n", "\n", "", True),  # blank line: no next-line completions
    ("block", "def f(x):", "\n", "\n    y = x\n    return y\ndef g", "\n    y = x\n    return y", True),
    ("block", "    y = ", "\n", "x\n    return y\n\n\n", "x\n    return y", True),
    ("block", "    y = ", "\n", "x\n    return y\nprint", "x\n    return y", True),
    ("block", "if (a) {", "\n", "\n  b();\n}\nfoo", "\n  b();\n}", True),
    ("block", "    y = ", ")\n", "x\n    z", "x", True),  # text after the cursor: line mode
])
def test_stop_rule(mode, prefix, suffix, generated, expected, done):
    assert StopRule(mode, prefix, suffix)(generated) == (expected, done)


CALL = "foo(\n        a,\n        b,\n    )"


@pytest.mark.parametrize("prefix, suffix, generated, expected, done", [
    ("    x = ", "\n", CALL + "\n    y = 1", CALL, True),  # a call broken black's way: to where it closes
    ("    x = ", "\n", CALL + ".bar(\n        c\n    )\n", CALL + ".bar(\n        c\n    )", True),
    ("    x = ", "\n", "foo(\n        a,", "foo(\n        a,", False),  # still open: wait
    ("    x = ", "\n", "foo(\n        a,\n\n", "foo(", True),  # a blank line before it closes: one line
    ("    x = ", "\n", 'foo(\n        "(", # (\n    )\n', 'foo(\n        "(", # (\n    )', True),
    ("    x = ", "\n", "[\n        1,\n    ]\n", "[\n        1,\n    ]", True),
    ("    x = ", "\n", "{\n        1: 2,\n    }\n", "{\n        1: 2,\n    }", True),  # a literal
    ("    if (a) ", "\n", "{\n  b();\n}\n", "{", True),  # a brace block is block mode's
    ("    ", "\n", "return {\n        1: 2,\n    }\n", "return {\n        1: 2,\n    }", True),
    ("    x = lambda: ", "\n", "{\n  b\n}\n", "{\n  b\n}", True),
    ("    x = ", "\n", "foo(a)\n    y = (", "foo(a)", True),  # the first line closed what it opened
    ("    x = ", ")\n", "foo(\n        a,\n    )\n", "foo(", True),  # text after the cursor: its line ends it
    ("    x = foo(", "\n", "\n        a,\n", "\n        a,", True),  # nothing opened on it: as before
    ("    x = bar(a, ", "\n", "b), foo(\n        c,\n    )\n", "b), foo(\n        c,\n    )", True),
])
def test_line_mode_goes_on_to_where_a_bracket_it_opened_closes(prefix, suffix, generated, expected, done):
    """Line mode ended a call the model broke over lines at its first line, `dict(`: all a user got of code
    written black's way (22 of 354 completions on bench/crossfile at stop 49). It goes on to the line that
    closes the bracket; unclosed at the model's end or the token budget, it keeps the first line."""
    from longllama_lsp.engine import _Stop

    rule = StopRule("line", prefix, suffix)
    assert rule(generated) == (expected, done)
    assert rule.ended("foo(\n        a,\n        b", out_of_tokens=True) == "foo("
    stop = _Stop(rule, lambda _ids, new: "".join(new), [], "")  # fed as the engine does, a token (here a character) at a time
    fed = next((k for k in range(1, len(generated) + 1) if stop(list(generated[:k]))), None)
    assert (stop.kept, fed is not None) == (expected, done)


@pytest.mark.parametrize("mode, prefix, generated, expected", [
    ("block", "def f(x):", "\n    y = g(x)\n    return h(y,", "\n    y = g(x)"),  # the cut line goes
    ("block", "    y = ", "x\n    # the rest of the comm", "x"),
    ("block", "    y = ", "x\n    return y\n", "x\n    return y"),  # cut at a line's end: nothing lost
    ("block", "def f(x):", "\n    return h(y,", "\n    return h(y,"),  # no finished line: the cut one stays
    ("block", "    y = ", "foo(a, b", "foo(a, b"),
    ("line", "x = ", "foo(1,", "foo(1,"),  # line mode keeps its one line
])
def test_a_block_cut_by_the_token_budget_drops_its_unfinished_line(mode, prefix, generated, expected):
    """A block completion ended by max tokens ended mid-line (`return h(y,`, half a comment): accepted, the
    editor got code that does not parse. It ends at the last line the model finished."""
    from longllama_lsp.engine import _Stop

    rule = StopRule(mode, prefix, "\n")
    assert rule.ended(generated, out_of_tokens=True) == expected
    stop = _Stop(rule, lambda _ids, new: "".join(new), [], "")
    stop.final(list(generated), out_of_tokens=True)
    assert stop.kept == expected
    stop.final(list(generated), out_of_tokens=False)  # ended by eos: the last line is the model's own end
    assert stop.kept == rule(generated)[0]


def _syntax_stop(path: str, marked: str, generated: str) -> tuple[str, int]:
    """Feed `generated` token by token (here: char by char) as the engine does: (kept, chars fed)."""
    offset = marked.index("|")
    text = marked.replace("|", "")
    rule = StopRule("block", text[:offset].rsplit("\n", 1)[-1], text[offset:], SyntaxBlock.at(path, text, offset))
    for k in range(1, len(generated) + 1):
        kept, done = rule(generated[:k])
        if done:
            return kept, k
    return rule(generated)[0], -1


def test_block_stop_at_the_brace_that_closes_the_cursors_block_js():
    src = "function f(x) {\n  if (x) {\n    |\n  }\n  return 2;\n}\n"
    # a brace inside a string does not count; the closing brace is kept (finish() trims it against the suffix)
    generated = "const s = '}';\n    g(s); }\n    more();\n"
    kept, fed = _syntax_stop("a.js", src, generated)
    assert kept == "const s = '}';\n    g(s); }" and fed == len(kept)
    # the indentation rule alone misses a brace at the end of an indented line
    assert StopRule("block", "    ", "\n  }\n")(generated) == (generated, False)


def test_block_stop_at_the_brace_that_closes_the_cursors_block_go():
    src = "package m\n\nfunc f() int {\n\tx := 1\n\t|\n"
    kept, _ = _syntax_stop("m.go", src, "if x > 0 {\n\t\treturn 1\n\t}\n\treturn 0\n}\n\nfunc g() {}\n")
    assert kept == "if x > 0 {\n\t\treturn 1\n\t}\n\treturn 0\n}"  # the inner block's brace does not stop it
    assert finish(kept, "\n}\n").endswith("return 0")  # the buffer's own closing brace is not repeated


def test_block_stop_python_dedent_below_the_enclosing_block_not_inside_strings():
    src = "def f(x):\n    y = 1\n    |\n"
    kept, _ = _syntax_stop("a.py", src, 'z = """\ndoc at column 0\n"""\n    return z\ndef g():\n    pass\n')
    assert kept == 'z = """\ndoc at column 0\n"""\n    return z'  # the docstring line is no dedent
    # a continuation line: the block is the method body (8), not the cursor line's indentation (17)
    src = "class A:\n    def f(self, x):\n        y = call(a,\n                 |\n        )\n"
    assert SyntaxBlock.at("a.py", src.replace("|", ""), src.index("|")).indent == 8
    kept, _ = _syntax_stop("a.py", src, "b)\n        return y\n\n    def g(self):\n        pass\n")
    assert kept.rstrip() == "b)\n        return y"
    assert SyntaxBlock.at("notes.txt", "x", 1) is None and SyntaxBlock.at(None, "x", 1) is None


def test_trim_overlap_and_finish():
    assert trim_overlap("foo(x)", ")") == "foo(x"
    assert trim_overlap("foo", "o()") == "foo"  # short identifier overlap is not a duplicate
    assert trim_overlap("\n    return x", "\n    return x\n") == ""
    assert finish("a + b  \n", " + b\n") == "a"
    assert finish("   \n", "") == ""
    assert word_before("    self.gre") == "gre" and word_before("x = ") == ""


# -- prefix reuse ----------------------------------------------------------------------------------------

@torch.no_grad()
def test_crop_then_continue_equals_fresh_forward(tiny_model, smol_tokenizer):  # noqa: F811
    """What prefix reuse relies on: crop the local cache, feed the changed tokens == a fresh prefill."""
    old = smol_tokenizer(CODE[:200], add_special_tokens=False)["input_ids"][:50]
    new = old[:40] + smol_tokenizer(" other tokens here", add_special_tokens=False)["input_ids"]
    memory = tiny_model.encode_memory(torch.tensor([old[:30]]))
    for mem in (None, memory):
        fresh = tiny_model(torch.tensor([new]), memory=mem, use_cache=True, last_context_length=128).logits[0, -1]
        cache = tiny_model(torch.tensor([old]), memory=mem, use_cache=True, last_context_length=128).past_key_values
        cache.crop(40)
        reused = tiny_model(torch.tensor([new[40:]]), past_key_values=cache, use_cache=True,
                            last_context_length=128).logits[0, -1]
        assert (fresh - reused).abs().max().item() < ATOL


def test_engine_generate_reuses_the_common_prefix(engine, smol_tokenizer):  # noqa: F811
    ids = smol_tokenizer(CODE[:300], add_special_tokens=False)["input_ids"][:60]
    edited = ids[:50] + ids[52:60]
    memory = engine.model.encode_memory(torch.tensor([ids[:20]]))
    first = engine.generate(ids, memory, 6, session="doc")
    again = engine.generate(edited, memory, 6, session="doc")
    fresh = engine.generate(edited, memory, 6)
    assert first.reused_tokens == 0 and again.reused_tokens == 50 and again.timings["prefillTokens"] == 8
    assert again.tokens == fresh.tokens


def test_typing_reuses_the_local_cache(engine):
    engine.options.typeahead = False  # keys that follow the suggestion would skip the model
    offset = CODE.index("def main")
    first = engine.complete(CODE, offset, path="/repo/a.py")
    typed = CODE[:offset] + "def" + CODE[offset:]
    second = engine.complete(typed, offset + 3, path="/repo/a.py")
    assert isinstance(first, Completion) and isinstance(second, Completion)
    assert second.reused_tokens >= second.prompt_tokens - 3
    assert second.memory_tokens > 0  # the text before the window and after the cursor
    assert {"queue", "prompt", "memory", "prefill", "decode", "total"} <= set(second.timings)


def test_keys_typed_along_the_suggestion_are_answered_from_it(engine):
    offset = CODE.index("def main")
    first = engine.complete(CODE, offset, path="/repo/a.py", key="k")
    if first.text.strip():  # a suggestion is remembered with the text around it
        assert engine._suggested["k"] == (CODE[:offset], first.text, CODE[offset:])
    engine._suggested["k"] = (CODE[:offset], "def main2():", CODE[offset:])  # the tiny model's own are noise
    ahead = engine.complete(CODE[:offset] + "de" + CODE[offset:], offset + 2, path="/repo/a.py", key="k")
    assert ahead.text == "f main2():" and ahead.stop_reason == "typeahead"
    assert engine.status()["requests"]["typeahead"] == 1 and engine.last_timings["typeahead"] == 1
    # a key off the suggestion, or the text after the cursor changed: the model again
    again = engine.complete(CODE[:offset] + "dx" + CODE[offset:], offset + 2, path="/repo/a.py", key="k")
    assert again.stop_reason != "typeahead"
    engine._suggested["k"] = (CODE[:offset], "def main2():", CODE[offset:])
    edited = CODE[:offset] + "de" + CODE[offset:] + "# more\n"
    assert engine.complete(edited, offset + 2, path="/repo/a.py", key="k").stop_reason != "typeahead"
    assert engine.status()["requests"]["typeahead"] == 1


def _forced_texts(engine, tokenizer, healed: str) -> set[str]:
    """The texts of the tokens generation may start with when it must redo `healed`."""
    allowed, _ = engine.decoder._opening("", healed, text_first=False)
    return {tokenizer.decode([i]) for i in allowed.nonzero().flatten().tolist()}


def test_cursor_after_indentation_heals_the_split_token(engine, smol_tokenizer):  # noqa: F811
    """After indentation the prompt ends before the whitespace tokens and generation must redo them."""
    engine.options.typeahead = False
    text = "def area(r):\n    pi = 3.14\n    \n"
    offset = text.index("    \n") + 4
    ids = smol_tokenizer(text[:offset])["input_ids"]
    healed_ids, healed = engine._heal(ids, "    ")
    assert healed == "\n    " and healed_ids == ids[: len(healed_ids)] and len(healed_ids) < len(ids)
    assert smol_tokenizer.decode(healed_ids).endswith("3.14")  # "\n    " is one token: redone whole
    assert engine._heal(ids, "    x") == (ids, "")  # not only whitespace before the cursor: as is
    allowed = _forced_texts(engine, smol_tokenizer, "\n    ")
    # the tokenizer's own split ("\n   " + " return"), or a token that goes on past it; not "\n" then spaces, nor
    # "\n    " then "return": splits the model never saw
    assert "\n   " in allowed and not {"\n", "\n    ", "\n\n", " return"} & allowed
    assert all("\n    ".startswith(t) or t.startswith("\n    ") for t in allowed)
    engine.options.max_tokens = 4
    got = engine.complete(text, offset, path="/repo/area.py")
    assert isinstance(got, Completion) and got.prompt_tokens == len(healed_ids)
    assert "\n" not in got.text  # line mode: the regenerated line break is not part of the answer


# The cursor's last token, redone by generation forced to start with its text: (the text before the cursor, that
# token's text, tokens generation may start with, tokens it may not).
HEALED_AT_THE_CURSOR = {
    # Mid-word (how editors ask while the user types), the prompt ended on " te", a split the model never saw: it
    # glued a new word on (" te" + ".get(...)", "Ba" + "ftaCommand"). No split word either (" " then "te").
    "word": ("from ._compat import term_len\n\n\ndef width(line):\n    return te", " te",
             {" te", " term", " test"}, {" ", " t", " return", "te"}),
    # After `raise ` the prompt ended on a bare space token, which in BPE comes before digits (a word brings its
    # own: " request"): completions read `raise 404`, or began with a second space, which editors insert after
    # the one typed.
    "space": ("def fail(request):\n    raise ", " ", {" ", " request", " ValueError"}, {"4", "request", "\n"}),
    # BPE merges punctuation (`("`, `()`, `["`, `.__`): a prompt ending at `open(` ended on a `(` the model had only
    # seen before a word, so `open("` and `f()` were out of reach; a word after it is a token of its own.
    "punctuation": ("def read(path):\n    return open(", "(", {"(", '("', "()", "(*", "('"}, {"self", " (", ")"}),
}


@pytest.mark.parametrize("case", HEALED_AT_THE_CURSOR)
def test_the_token_at_the_cursor_is_healed(engine, smol_tokenizer, case):  # noqa: F811
    text, healed, reachable, unreachable = HEALED_AT_THE_CURSOR[case]
    engine.options.typeahead = False
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert engine._heal(ids, text.rsplit("\n", 1)[1]) == (ids[:-1], healed)
    assert smol_tokenizer.decode(ids[:-1]) == text[:-len(healed)]
    allowed = _forced_texts(engine, smol_tokenizer, healed)
    assert reachable <= allowed and not unreachable & allowed
    engine.options.max_tokens = 4
    got = engine.complete(text, len(text), path="/repo/h.py")
    assert isinstance(got, Completion) and got.prompt_tokens == len(ids) - 1
    # what was typed is not repeated (the tiny model's own text may begin with punctuation)
    assert case == "punctuation" or not got.text.startswith(healed.strip() or healed)


def test_healing_redoes_one_token_within_the_text_at_the_cursor(engine, smol_tokenizer):  # noqa: F811
    def heal(text: str, line_prefix: str | None = None) -> str:
        ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
        healed_ids, healed = engine._heal(ids, text if line_prefix is None else line_prefix)
        assert healed_ids == ids[:len(healed_ids)]
        return healed

    assert heal("x = self.parse_options") == "options"  # a word's last token only
    assert heal("x.__") == ".__"  # `_` is a word character, yet merges with `.`
    assert heal("x = (") == " (" and heal("x = ") == " "  # with the space its token holds
    # the last token is not the text at the cursor (ids of another text): as is
    assert heal("    return te", "    return te(") == heal("    raise ", "    raise (") == ""
    engine.options.typeahead, engine.options.max_tokens = False, 2
    for text in ("x = 1\u00a0", "x = 1\f", "x\r"):  # other whitespace ends a line: a completion, no error
        assert isinstance(engine.complete(text, len(text), path="/repo/ws.py"), Completion)


def test_cursor_on_a_blank_line_heals_the_blank_lines(engine, smol_tokenizer):  # noqa: F811
    """BPE writes blank lines with what follows them ("()" + "\n\n           " + " with"; "\n\n" + "\n" + "def"),
    and at a prompt's end in one token ("\n\n\n"; "\n" + "\n            "): on a line after a blank one the
    prompt ended on a split the model never saw, and it wrote one more blank line, which line mode cuts to
    nothing. The whitespace back to the last line with text is redone, forced."""
    for text in ("        x()\n\n            ", "    return x\n\n\n", "x = 1\n"):
        ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
        healed_ids, healed = engine._heal(ids, text.rsplit("\n", 1)[1])
        head = text.rstrip(" \n")
        assert healed == text[len(head):] and smol_tokenizer.decode(healed_ids) == head, text
    # healed whitespace is redone as the tokenizer splits it before a word, or by tokens that cover it: at
    # attr/setters.py:68:9 the model took "\n", "\n", eight single spaces, then wrote `17.1.0`
    blank_then_8 = _forced_texts(engine, smol_tokenizer, "\n\n        ")
    assert "\n\n       " in blank_then_8 and not {"\n", "\n\n", " "} & blank_then_8
    assert "\n\n           " in _forced_texts(engine, smol_tokenizer, "\n\n            ")
    assert _forced_texts(engine, smol_tokenizer, "\n\n\n") & {"\n", "\n\n", "\n\n\n"} == {"\n\n"}
    assert "\n" in _forced_texts(engine, smol_tokenizer, "\n")  # BPE's own "\n" + "def" at column 0
    lines = "x = 1\n" + " \n" * 300  # a file of blank lines: the prompt keeps its text, a few tokens are redone
    ids = smol_tokenizer(lines, add_special_tokens=False)["input_ids"]
    healed_ids, healed = engine._heal(ids, "")
    assert len(ids) - len(healed_ids) == HEALED_WHITESPACE_TOKENS and lines.endswith(healed) and not healed.strip()


def test_the_bundled_model_writes_on_a_blank_line(smollm2):
    """Where a user starts a new statement after a blank line (a function after two, a block's next step
    after one) line-mode completions were empty: on all 39 crossfile holes at column 0 after a blank line."""
    eng = Engine.load(smollm2.path, options=EngineOptions(max_tokens=12, memory=False, typeahead=False))
    try:
        text = "import os\n\n\ndef home():\n    return os.environ['HOME']\n\n\n"
        nested = "def total(items):\n    count = 0\n    for item in items:\n        count += item\n\n    "
        assert eng.complete(text, len(text), path="/repo/paths.py").text.strip()
        assert eng.complete(nested, len(nested), path="/repo/sums.py").text.strip()
        # a new line after code, at the end of the file as when writing new code: the model's blank line first
        # left these empty (Decoder's text_first)
        for after_code in ("import os\nimport sys\n", "x = 1\ny = 2\n"):
            assert eng.complete(after_code, len(after_code), path="/repo/new.py").text.strip(), after_code
    finally:
        eng.close()


def test_on_a_blank_line_generation_puts_text_before_a_line_break(engine, smol_tokenizer):  # noqa: F811
    """text_first: while healing redoes "\n", no token that adds a blank line ("\n\n"), though one that indents
    ("\n    ") may; after it, while the line holds only whitespace, only tokens that put text on it (no line
    break, no more spaces); once it holds text, nothing is banned."""
    def texts(mask):
        return {smol_tokenizer.decode([i]) for i in mask.nonzero().flatten().tolist()}

    healing, more = engine.decoder._opening("", "\n", text_first=True)
    assert more and {"\n", "\n    "} <= texts(healing) and "\n\n" not in texts(healing)
    # an indented cursor line (the editor's indentation): no token that indents past it
    indented, _ = engine.decoder._opening("", "\n    ", text_first=True)
    assert "\n   " in texts(indented) and not {"\n        ", "\n     ", "\n\n"} & texts(indented)
    assert "\n        " in _forced_texts(engine, smol_tokenizer, "\n    ")
    assert "\n\n" in _forced_texts(engine, smol_tokenizer, "\n")
    after, more = engine.decoder._opening("\n", "\n", text_first=True)
    banned = texts(~after)
    assert more and {"\n", "\n\n", "  \n", " ", "    "} <= banned
    assert not {"x", " def", "import", "#"} & banned
    assert engine.decoder._opening("\n    ", "\n", text_first=True)[0] is not None  # indentation: still blank
    assert engine.decoder._opening("\nx", "\n", text_first=True) == (None, False)
    assert engine.decoder._opening("\n", "\n", text_first=False) == (None, False)
    line = StopRule("line", "    ", "\n")
    assert line.text_first and not StopRule("line", "x = ", "\n").text_first
    assert not StopRule("block", "    ", "\n").text_first and not StopRule("line", "    ", "y)\n").text_first


def test_after_a_typed_space_a_completion_does_not_start_with_one_more():
    """Healing redid "\n    " as one 4-space token and the model went on with " def" (BPE's word token):
    the editor would indent the line a column too far. One space before a word goes; deeper indentation and
    text after no typed space stay."""
    from longllama_lsp.engine import _Stop

    def pieces(_ids, new):  # a continuation whose "token ids" are their texts
        return "".join(new)

    stop = _Stop(StopRule("line", "    ", ""), pieces, [], "\n    ", after_space=True)
    assert stop.after_cursor(["\n    ", " def f():"]) == "def f():"
    assert stop.after_cursor(["\n    ", "    deeper()"]) == "    deeper()"
    assert stop.after_cursor(["\n  "]) is None  # the healed text is not covered yet
    assert _Stop(StopRule("line", "x", ""), pieces, [], "").after_cursor([" = 1"]) == " = 1"


def _sentencepiece_tokenizer():
    """A Metaspace BPE, as LLaMA's: a token decoded alone loses its leading space ("▁te" -> "te")."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(["orig_len = term_len(line)", "x = te", "te term test text"] * 50, vocab_size=120,
                           min_frequency=2, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def test_forced_prefix_tokens_cover_the_rest_or_stop_at_whitespace():
    from longllama_lsp.decode import _TokenTexts

    texts = ["", " ", "  ", " t", " te", " term", " ter", "te", "term", "t", "x", " tea", " te ", "\n", "e"]
    texts = texts + ["".join(random.Random(i).choices(" te\nrx", k=random.Random(-i).randint(1, 4))) for i in range(300)]
    texts = texts + [t.replace("r", "é") for t in texts[-100:]]  # beyond ASCII
    tt = _TokenTexts(texts)
    for need in (" te", "te", " ", "  te", " te  ", "\n te", "e", "rx t", "x", "x ", "e\n", " é", "éx"):
        brute = {i for i, t in enumerate(texts)
                 if t and (t.startswith(need) or need.startswith(t) and not need[len(t):].strip())}
        assert set(tt.allowed(need)) == brute, need
    assert {texts[i] for i in tt.allowed(" te")} >= {" te", " term", " ter", " tea", " te "}
    assert not {"t", " t", " "} & {texts[i] for i in tt.allowed(" te")}  # never a split inside the word
    # given the tokenizer's own first tokens, only those parts
    assert {texts[i] for i in tt.allowed(" te  ")} & {" te", " te "} == {" te", " te "}
    assert {texts[i] for i in tt.allowed(" te  ", starts={" te "})} & {" te", " te "} == {" te "}
    assert " " in {texts[i] for i in tt.allowed(" ", starts={" "})} - {texts[i] for i in tt.allowed(" ", starts={" x"})}


def test_word_healing_keeps_sentencepiece_spaces():
    """The healed text and the forced tokens are read as they continue the prompt: decoded alone,
    SentencePiece's "▁te" is "te", and the completion after the cursor lost or kept a character."""
    tok = _sentencepiece_tokenizer()
    term, x = tok.convert_tokens_to_ids("▁term_len(line)"), tok.convert_tokens_to_ids("▁x")
    assert tok.decode([term]) == "term_len(line)"  # the space is gone when decoded alone
    # unforced, the model writes " x" after the prompt; among the tokens that start with " te" it prefers
    # " term_len(line)" (looping_model's direction of every token outside the cycle is len(cycle))
    model = looping_model(tok, [x, term, tok.eos_token_id])
    with torch.no_grad():
        model.lm_head.weight[term, 3] = 0.5
    eng = Engine(model, tok, options=EngineOptions(max_tokens=4))
    try:
        text = "x = te"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert eng._heal(ids, text) == (ids[:-1], " te")
        assert eng.complete(text, len(text)).text == "rm_len(line)"
        # the tokenizer's own split of healed whitespace, where it reads back; "\n" is unknown to this one: any
        assert eng.decoder._own_starts("  ") == {" "} and eng.decoder._own_starts("\n    ") is None
    finally:
        eng.close()


def test_local_window_leaves_room_for_max_tokens(engine):
    assert engine.context_tokens(8) == 64  # min(last_context_length, window - max_tokens)
    assert engine.context_tokens(100) == 28
    with pytest.raises(ValueError, match="window"):  # the token level refuses a flush mid-generation
        engine.generate(list(range(100, 130)), None, 100)
    long = engine.complete(CODE, len(CODE), max_tokens=500)  # the text level clamps to half the window
    assert long.generated_tokens <= 64 and long.prompt_tokens <= 64
    with pytest.raises(ValueError, match="outside"):
        engine.submit_complete(CODE, len(CODE) + 1)


# -- cancellation ----------------------------------------------------------------------------------------

def test_cancelled_request_stops_within_one_step(engine, smol_tokenizer):  # noqa: F811
    ids = smol_tokenizer("def f(x):\n    return", add_special_tokens=False)["input_ids"]
    seen, holder = [], []

    def on_token(tok):
        seen.append(tok)
        if len(seen) == 3:
            holder[0].cancel()

    holder.append(engine.submit_generate(ids, None, 100, on_token=on_token, stop=lambda new: False))
    with pytest.raises(Cancelled):
        holder[0].result(timeout=60)
    assert len(seen) == 3


def test_newest_request_per_document_wins(engine):
    gate = threading.Event()
    blocker = engine.submit(lambda req: gate.wait(30))
    older = engine.submit_complete(CODE, 20, path="a.py", key="file:///a.py")
    other = engine.submit_complete(CODE, 20, path="b.py", key="file:///b.py")
    newer = engine.submit_complete(CODE, 25, path="a.py", key="file:///a.py")
    gate.set()
    blocker.result(timeout=30)
    assert older.superseded and older.future.cancelled()
    assert isinstance(newer.result(timeout=60), Completion) and isinstance(other.result(timeout=60), Completion)
    hold = threading.Event()
    stale = engine.submit(lambda req: hold.wait(30), key="file:///c.py")  # e.g. didChange while generating
    engine.cancel("file:///c.py")
    hold.set()
    assert stale.superseded and stale.cancelled



def test_questions_from_two_sessions_both_get_answers(engine):
    """Questions supersede the same session's older question only (two editors on one TCP server)."""
    gate = threading.Event()
    blocker = engine.submit(lambda req: gate.wait(30))
    first = engine.submit_answer("What is main?", key=(1, "longllama/ask"))
    second = engine.submit_answer("What is os?", key=(2, "longllama/ask"))
    newer = engine.submit_answer("What does main call?", key=(2, "longllama/ask"))
    gate.set()
    blocker.result(timeout=30)
    assert second.superseded and not first.superseded
    assert first.result(timeout=60).text is not None and newer.result(timeout=60).text is not None

# -- memory and sources ----------------------------------------------------------------------------------

@pytest.fixture
def repo(tmp_path, engine, smol_tokenizer):  # noqa: F811
    """A bank with a.py and b.py, one chunk each, as an indexer would leave it."""
    from indexer.bank import MemoryBank

    cfg = engine.model.config
    bank = MemoryBank(cfg.mem_layers, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu")
    files = {"a.py": CODE[:250], "b.py": CODE[250:]}
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
        ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"][:100]
        bank.add(rel, engine.model.encode_memory(torch.tensor([ids])), ChunkMeta(rel, rel, 1, 9, rel[0],
                                                                                      content_hash=rel))
    # a repository.MemorySource; nothing of a buffer is indexed (chunk), so the current file is left out
    return SimpleNamespace(bank=bank, root=tmp_path, lock=threading.RLock(), chunk=lambda path, text: [],
                           chunk_text=lambda meta: files[meta.path])


def test_sources_come_from_the_bank_minus_the_current_file(engine, repo):
    engine.repositories = lambda: (repo,)
    text = "def main():\n    g = Gre"
    done = engine.complete(text, len(text), path=str(repo.root / "a.py"))
    assert done.memory_tokens == repo.bank.status().span_tokens  # a.py's slots are masked, not removed
    assert [s.path for s in done.sources] == ["b.py"]
    assert done.sources[0].file == str(repo.root / "b.py") and 0 < done.sources[0].weight <= 1
    without = engine.complete(text, len(text), path=str(repo.root / "a.py"), memory=False)
    assert without.sources == [] and without.memory_tokens == 0
    unnamed = engine.complete(text, len(text), path=str(repo.root / "a.py"), sources=False)  # inline replies
    assert unnamed.sources == [] and unnamed.text == done.text and unnamed.memory_tokens == done.memory_tokens


def test_a_chunks_first_slot_is_left_out_of_its_source_share(engine, repo):
    """An attention sink (the first token of a file's first chunk) must not make its chunk the top source:
    b.py's first slot holds most of the mass here, a.py's other slots more than b.py's other slots."""
    engine.repositories = lambda: (repo,)
    asm = engine._assembler.assemble(None, [])
    a, b = (repo.bank.chunk_slots(next(iter(repo.bank.chunks_of(p)))) for p in ("a.py", "b.py"))
    start = asm.segments[0].start
    attention = torch.zeros(asm.tokens)  # (M,) as Decoder sums it
    attention[start + b.start] = 0.6
    attention[start + b.start + 1:start + b.stop] = 0.1 / (len(b) - 1)
    attention[start + a.start:start + a.stop] = 0.3 / len(a)
    found = engine._assembler.sources(attention, 1.0, asm)
    assert [s.path for s in found] == ["a.py", "b.py"]
    assert abs(found[1].weight - 0.1) < 1e-6


def test_a_chunk_that_defines_a_name_the_question_names_is_the_first_source(engine, repo):
    """Asked "Which file defines retry_if_exception_type?", tenacity's five top sources used the name and its
    class came sixth. A chunk that defines a named name comes first when the answer read it at all, even
    with too little attention to be among the 64 slots sources are read from."""
    engine.repositories = lambda: (repo,)
    asm = engine._assembler.assemble(None, [])
    a, b = (repo.bank.chunk_slots(next(iter(repo.bank.chunks_of(p)))) for p in ("a.py", "b.py"))  # symbols a, b
    start = asm.segments[0].start
    attention = torch.zeros(asm.tokens)  # (M,)
    attention[start + a.start:start + a.stop] = 0.9 / len(a)
    attention[start + b.start:start + b.stop] = 0.1 / len(b)
    assert len(a) > 64  # a's slots alone fill the 64 read
    assert [s.path for s in engine._assembler.sources(attention, 1.0, asm, top=1)] == ["a.py"]
    assert [s.path for s in engine._assembler.sources(attention, 1.0, asm, top=1, named=frozenset({"b"}))] == ["b.py"]
    attention[start + b.start:start + b.stop] = 0  # not read (retrieval left it out): not a source
    assert [s.path for s in engine._assembler.sources(attention, 1.0, asm, named=frozenset({"b"}))] == ["a.py"]


def test_a_question_is_told_where_the_names_it_names_are_defined(engine, repo, smol_tokenizer,  # noqa: F811
                                                                  monkeypatch):
    """Memory holds code, not the paths of its files: asked "Which file defines retry_if_exception_type?" the
    model named a file that does not exist. The prompt says where the index has the named names' definitions."""
    from longllama_lsp import engine as engine_module
    from longllama_lsp.assembly import Definition, Source
    from longllama_lsp.engine import ask_prompt_ids

    engine.repositories = lambda: (repo,)
    asm = engine._assembler.assemble(None, [])
    found = engine._assembler.defined(asm, frozenset({"b", "zz"}))
    assert [(d.source.path, d.source.symbol) for d in found] == [("b.py", "b")]
    assert engine._assembler.defined(asm, frozenset()) == []
    seen = []
    monkeypatch.setattr(engine_module, "ask_prompt_ids", lambda *a: seen.append(a[-1]) or ask_prompt_ids(*a))
    engine.answer("Which file defines b?", max_tokens=1)
    assert [(d.source.path, d.source.symbol, d.source.start_line) for d in seen[0]] == [("b.py", "b", 1)]
    said = Definition(Source("pkg/m.py", 12, 20, "C", 0.0), "class C(Base):", ("run", "stop"))
    text = smol_tokenizer.decode(ask_prompt_ids(smol_tokenizer, "Which file defines C?", defined=[said]))
    assert ("Which file defines C?\n\n(Defined in this repository: C in pkg/m.py, line 12: `class C(Base):`, "
            "members run, stop.)") in text
    assert "Defined in" not in smol_tokenizer.decode(ask_prompt_ids(smol_tokenizer, "Which file defines C?"))


def test_a_definitions_line_and_members():
    from longllama_lsp.assembly import definition_line, members_of

    text = "@dataclass\nclass Retry(\n    Base,\n    Other,\n):\n    x = 1\n"
    assert definition_line(text, "Retry") == "class Retry( Base, Other, ):"  # the signature black broke
    assert definition_line("    def send(self, request):\n        pass\n", "Session.send") == "def send(self, request):"
    assert definition_line("x = 1\n", "missing") == ""
    rows = [SimpleNamespace(symbol=s, start_line=n) for s, n in
            (("C.stop", 9), ("C", 1), ("C.run", 3), ("C.Inner.deep", 5), ("D.other", 2), (None, 4))]
    assert members_of("C", rows) == ("run", "stop")  # direct members, in file order


def test_answer_streams_tokens_and_names_sources(engine, repo):
    engine.repositories = lambda: (repo,)
    pieces: list[str] = []
    answer = engine.answer("What does Greeter do?", on_token=pieces.append)
    assert "".join(pieces).strip() == answer.text
    assert answer.generated_tokens > 0 and {s.path for s in answer.sources} <= {"a.py", "b.py"}
    assert answer.sources, "the bank is the only memory: something must be attended"


# -- the CLI commands ------------------------------------------------------------------------------------

def test_offset_of_counts_lines_as_lsp_does():
    from longllama_lsp.commands import offset_of

    text = "a\x0cb\nc😀d\r\ne"
    assert offset_of(text, 2, 3) == text.index("d") and offset_of(text, 3, 2) == len(text)
    with pytest.raises(ValueError, match="line 4"):
        offset_of(text, 4, 1)
    with pytest.raises(ValueError, match="column 9"):
        offset_of(text, 1, 9)


def test_complete_command_prints_json(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    import json

    from longllama_lsp.cli import main

    (tmp_path / "m.py").write_text(CODE)
    assert main(["complete", f"{tmp_path / 'm.py'}:19:5", "--model", str(tiny_model_dir), "--no-memory",
                 "--json", "--max-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"text", "sources", "timings", "stop_reason"} <= set(out) and out["generated_tokens"] <= 4


def test_cpu_float32_models_get_bfloat16_decode_copies_unless_told(tiny_model_dir):  # noqa: F811
    from longllama_lsp.load import load_model_and_tokenizer
    from longllama_lsp.model.decode_weights import decode_dtype

    model, _, _ = load_model_and_tokenizer(tiny_model_dir, "cpu")
    assert decode_dtype(model) == torch.bfloat16
    model, _, _ = load_model_and_tokenizer(tiny_model_dir, "cpu", decode_dtype="float32")
    assert decode_dtype(model) is None
    model, _, _ = load_model_and_tokenizer(tiny_model_dir, "cpu", dtype="bfloat16")
    assert decode_dtype(model) is None  # already half size: nothing to gain


def test_the_server_logs_the_device_and_dtype_the_model_loaded_with(tiny_model_dir, caplog):  # noqa: F811
    """Unset --device/--dtype are chosen at load: the log says what was chosen, never 'None'."""
    import asyncio

    from longllama_lsp.settings import ModelSettings
    from longllama_lsp.shared import SharedServices

    async def start() -> None:
        shared = SharedServices()
        try:
            await shared.start_engine(ModelSettings(path=str(tiny_model_dir)), EngineOptions())
        finally:
            shared.close()
    with caplog.at_level("INFO", logger="longllama_lsp"):
        asyncio.run(start())
    assert "device auto, dtype auto" in caplog.text and "device None" not in caplog.text
    assert "device cpu, dtype float32, decode dtype bfloat16, fill-in-the-middle no" in caplog.text
