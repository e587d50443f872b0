"""Issue 16: cross-file facts (finetune/pycode.py), retrieval training data (finetune/retrieval_data.py),
the per-chunk memory training step (finetune/retrieval_train.py) and the skill eval (finetune/skill_eval.py).

Test Data: small Python packages written into tmp dirs (every name made up here); the recall
fixture's byte-level BPE (tests/fixtures/recall-tiny) as tokenizer; seeded tiny LongLLaMA models
(PRESETS["tiny"], window raised to 128 where prompts need it).
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from finetune import pycode
from finetune.passkey import QUESTION, TASK
from finetune.retrieval_data import ASK_PASSKEY, Corpus, ExampleMaker, MixArgs, find_packages, is_held_out

FIXTURES = Path(__file__).parent / "fixtures"
RECALL = FIXTURES / "recall-tiny"

SHAPES = '''"""Shapes."""
import math

DEFAULT_SIDES = 4


class Polygon:
    sides = DEFAULT_SIDES

    def area(self):
        return 0.0


def make_square(size):
    return Polygon()
'''

DRAW = '''"""Drawing."""
from .shapes import Polygon, make_square
from . import colors


def draw(canvas):
    square = make_square(3)
    if isinstance(square, Polygon):
        canvas.paint(colors.RED_TONE, square.area())
    return square
''' * 3

COLORS = '''RED_TONE = "#ff0000"
BLUE_TONE = "#0000ff"
'''


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def tokenizer():
    from longllama_lsp.model.loading import load_tokenizer

    return load_tokenizer(RECALL)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> Path:
    """Test Data: site-like root with a package `geom` (4 files; layout.py imported by none), a held-out `requests`, a vendored
    held-out copy inside `vendorer`, and a package `other` used as distractor code."""
    root = tmp_path_factory.mktemp("site")
    (root / "geom").mkdir()
    (root / "geom" / "__init__.py").write_text("")
    (root / "geom" / "shapes.py").write_text(SHAPES)
    (root / "geom" / "draw.py").write_text(DRAW)
    (root / "geom" / "colors.py").write_text(COLORS)
    (root / "geom" / "layout.py").write_text("def place_item(grid, row, col):\n    return grid[row][col]\n\n" * 12)
    (root / "requests").mkdir()
    (root / "requests" / "__init__.py").write_text("x = 1\n")
    (root / "requests" / "api.py").write_text("def get(url):\n    return url\n")
    (root / "vendorer" / "_vendor" / "click").mkdir(parents=True)
    (root / "vendorer" / "__init__.py").write_text("")
    (root / "vendorer" / "core.py").write_text("def run():\n    return 1\n" * 20)
    (root / "vendorer" / "_vendor" / "click" / "core.py").write_text("def command():\n    pass\n")
    (root / "other").mkdir()
    (root / "other" / "__init__.py").write_text("")
    (root / "other" / "util.py").write_text(("def helper(value):\n    return value * 2\n\n") * 30)
    return root


# ---------------------------------------------------------------------------------------------
# pycode


def test_analyse_exports_binds_imports_and_identifiers():
    facts = pycode.analyse(DRAW.split("\n\n\n")[0] + "\n\n\n" + DRAW.split("\n\n\n")[1])
    assert facts.exports == {"draw"}
    assert {"draw", "canvas", "square"} <= facts.binds
    assert "Polygon" not in facts.binds and "make_square" not in facts.binds  # imports do not bind
    assert pycode.Import(1, "shapes", ("Polygon", "make_square")) in facts.imports
    assert pycode.Import(1, "", ("colors",)) in facts.imports
    used = [n for _, _, n in facts.identifiers]
    assert "make_square" in used and "RED_TONE" in used
    assert "Polygon" in used  # the isinstance use, not the import (imports are skipped)
    shapes = pycode.analyse(SHAPES)
    assert shapes.exports == {"DEFAULT_SIDES", "Polygon", "sides", "area", "make_square"}
    assert "size" in shapes.binds and "size" not in shapes.exports  # a parameter is no export


def test_fast_exports_agree_with_the_full_walk():
    import json as stdlib_json

    for mod in ("decoder.py", "encoder.py", "__init__.py"):
        text = (Path(stdlib_json.__file__).parent / mod).read_text()
        assert pycode.exports(text) == pycode.analyse(text).exports


def test_resolve_imports_relative_absolute_and_submodules():
    modules = {"geom": "geom/__init__.py", "geom.shapes": "geom/shapes.py", "geom.colors": "geom/colors.py",
               "geom.sub.deep": "geom/sub/deep.py", "geom.sub": "geom/sub/__init__.py"}
    facts = pycode.analyse("from .shapes import Polygon\nfrom . import colors\nfrom ..shapes import x\n"
                           "import geom.sub.deep\nimport os\n")
    assert pycode.resolve_imports("geom/draw.py", facts.imports, modules) == [
        "geom/shapes.py", "geom/__init__.py", "geom/colors.py", "geom/sub/deep.py"]
    # In a package's __init__.py, "." is the package itself.
    facts = pycode.analyse("from .deep import y\n")
    assert pycode.resolve_imports("geom/sub/__init__.py", facts.imports, modules) == ["geom/sub/deep.py"]


def test_crossfile_flags_mark_exactly_the_names_of_other_files(tokenizer):
    facts = pycode.analyse(DRAW)
    names = pycode.crossfile_names(facts, pycode.exports(SHAPES) | pycode.exports(COLORS) | {"isinstance"})
    # Attributes count too (CrossCodeEval's criterion): square.area() names shapes.py's method.
    assert names == {"Polygon", "make_square", "RED_TONE", "area"}  # builtins and own names excluded
    enc = tokenizer(DRAW, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(s, e) for s, e, n in facts.identifiers if n in names]
    flags = pycode.token_flags(DRAW, enc["offset_mapping"], spans)
    flagged = "".join(tokenizer.decode([t]) for t, f in zip(enc["input_ids"], flags, strict=True) if f)
    assert flagged.replace(" ", "") == ("make_square" + "Polygon" + "RED_TONE" + "area") * 3
    # Byte spans are mapped to characters: a non-ASCII prefix shifts nothing.
    text = "é = 1\nPolygon()\n"
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.encode().index(b"Polygon")
    flags = pycode.token_flags(text, enc["offset_mapping"], [(start, start + len("Polygon"))])
    assert "".join(tokenizer.decode([t]) for t, f in zip(enc["input_ids"], flags, strict=True) if f) == "Polygon"


# ---------------------------------------------------------------------------------------------
# Training data


def test_held_out_repositories_are_excluded_at_any_depth(roots):
    names = {p.name: p for p in find_packages([roots])}
    assert set(names) == {"geom", "vendorer", "other"}
    assert not any("click" in f for f in names["vendorer"].files)
    assert is_held_out(["pip", "_vendor", "requests", "api.py"], ["requests"])
    assert is_held_out(["flask_sqlalchemy"], ["flask"]) and not is_held_out(["flasks"], ["flask"])


@pytest.fixture(scope="module")
def maker(roots, tokenizer):
    args = MixArgs(roots=[str(roots)], chunk_len=128, target_len=112, own_chunks=3, pool_code_chunks=2,
                   pool_filler_chunks=2)
    return ExampleMaker(Corpus(find_packages([roots]), tokenizer), args)


def _flagged_text(tokenizer, ex) -> str:
    return tokenizer.decode([t for t, f in zip(ex.ids[1:], ex.flags, strict=True) if f])


def _check_shapes(ex, args):
    assert len(ex.ids) == args.target_len + 1 and len(ex.weights) == len(ex.flags) == args.target_len
    assert 1 <= len(ex.memory) <= args.own_chunks and all(0 < len(c) <= args.chunk_len for c in ex.memory)


def test_repo_examples_remember_the_imported_definitions(maker, tokenizer):
    ex = maker.repo(random.Random(1))
    _check_shapes(ex, maker.args)
    assert ex.meta["path"] == "geom:geom/draw.py"  # the only file with imports and long enough
    names = ("make_square", "Polygon", "RED_TONE", "area")
    pieces = [tokenizer.decode([t]).strip() for t, f in zip(ex.ids[1:], ex.flags, strict=True) if f]
    assert pieces and all(any(p in n for n in names) for p in pieces)  # (the window may cut a name)
    assert "make_square" in "".join(pieces)
    assert all(w == maker.args.xid_weight for w, f in zip(ex.weights, ex.flags, strict=True) if f)
    first = tokenizer.decode(ex.memory[0])
    assert "def make_square" in first or "class Polygon" in first or "RED_TONE =" in first  # definitions first


def test_repo_examples_add_look_alikes_from_the_same_package(roots, tokenizer):
    corpus = Corpus(find_packages([roots]), tokenizer)

    def memory(same_repo_chunks: int) -> list[str]:
        args = MixArgs(roots=[str(roots)], chunk_len=128, target_len=112, own_chunks=2,
                       same_repo_chunks=same_repo_chunks)
        return [tokenizer.decode(c) for c in ExampleMaker(corpus, args).repo(random.Random(1)).memory]

    plain, hard = memory(0), memory(2)
    assert len(plain) == 2 and not any("place_item" in c for c in plain)
    assert hard[:2] == plain  # the definitions stay first, and the data stream is unchanged
    assert len(hard) == 4 and all("def place_item" in c for c in hard[2:])  # layout.py: not imported by draw.py
    with pytest.raises(ValueError, match="same_repo_chunks"):
        MixArgs(roots=[str(roots)], same_repo_chunks=-1)


def test_synthetic_examples_need_the_one_defining_chunk(maker, tokenizer):
    rng = random.Random(3)
    for _ in range(12):
        ex = maker.synthetic(rng)
        _check_shapes(ex, maker.args)
        assert _flagged_text(tokenizer, ex).strip() == ex.meta["answer"]
        first_line = ex.meta["definition"].split("\n")[0]
        holders = [c for c in ex.memory if first_line in tokenizer.decode(c)]
        assert len(holders) == 1, ex.meta  # one chunk defines it; the others hold decoys
        assert sum(ex.weights) < sum(ex.flags) + 0.2 * len(ex.flags)  # loss mostly on the answer


def test_passkey_examples_keep_the_key_out_of_the_local_window(maker, tokenizer):
    rng = random.Random(5)
    for _ in range(5):
        ex = maker.passkey(rng)
        _check_shapes(ex, maker.args)
        key = ex.meta["key"]
        answer_at = len(ex.flags) - sum(ex.flags)
        assert key not in tokenizer.decode(ex.ids[: answer_at + 1])
        assert _flagged_text(tokenizer, ex) == f" {key}."
        assert sum(key in tokenizer.decode(c) for c in ex.memory) == 1


def test_passkey_questions_come_in_every_prompt_style(roots, tokenizer):
    """The key must be read under ask's chat prompt, a bare question and code, not only after filler."""
    from longllama_lsp.engine import ask_prompt_ids

    args = MixArgs(roots=[str(roots)], chunk_len=128, target_len=240, own_chunks=3,  # ask's prompt: 174 ids here
                   passkey_prompts={"reference": 1, "ask": 1, "bare": 1, "code": 1})
    maker = ExampleMaker(Corpus(find_packages([roots]), tokenizer), args)
    rng, seen = random.Random(11), set()
    for _ in range(24):
        ex = maker.passkey(rng)
        _check_shapes(ex, args)
        key, style = ex.meta["key"], ex.meta["prompt"]
        seen.add(style)
        first = ex.flags.index(True)
        assert key not in tokenizer.decode(ex.ids[: first + 1])  # only the answer says it
        assert key in _flagged_text(tokenizer, ex) and sum(ex.flags) == sum(w > 0 for w in ex.weights)
        assert sum(key in tokenizer.decode(c) for c in ex.memory) == 1
        if style == "ask":  # exactly the prompt `longllama ask` sends
            assert any(ex.ids[:first + 1] == ask_prompt_ids(tokenizer, q) for q in ASK_PASSKEY)
            assert _flagged_text(tokenizer, ex).strip() == f"The pass key is {key}."
        if style == "bare":
            assert tokenizer.decode(ex.ids[: first + 1]) == QUESTION
        if style != "reference":
            assert not any(TASK in tokenizer.decode(c) for c in ex.memory)
    assert seen == {"reference", "ask", "bare", "code"}
    with pytest.raises(ValueError, match="passkey_prompts"):
        MixArgs(roots=[str(roots)], passkey_prompts={"chat": 1})


def test_prompt_styles_off_keep_the_data_stream(roots, tokenizer, maker):
    """Without passkey_prompts / synthetic_ask, examples are the ones earlier recipes made: the digest
    was taken before the prompt styles existed (run 9's data, so its recipe still reproduces)."""
    import hashlib

    rng = random.Random(4)
    ex = [maker.passkey(rng) for _ in range(3)] + [maker.synthetic(rng) for _ in range(3)]
    digest = hashlib.sha256(repr([(e.ids, e.memory, e.weights, e.flags) for e in ex]).encode()).hexdigest()
    assert digest[:16] == "d701d0b3acb10b9f"
    assert all(e.meta["prompt"] == "reference" for e in ex[:3]) and QUESTION in tokenizer.decode(ex[0].ids[-40:])


def test_synthetic_constants_are_also_asked_through_ask(roots, tokenizer):
    from longllama_lsp.engine import ask_prompt_ids

    args = MixArgs(roots=[str(roots)], chunk_len=128, target_len=240, own_chunks=3, synthetic_ask=1.0)
    maker = ExampleMaker(Corpus(find_packages([roots]), tokenizer), args)
    rng, asked = random.Random(2), 0
    for _ in range(24):
        ex = maker.synthetic(rng)
        _check_shapes(ex, args)
        if ex.meta["kind"] not in ("const", "dict"):
            assert ex.meta["prompt"] == "code"
            continue
        asked += 1
        first = ex.flags.index(True)
        prompt = tokenizer.decode(ex.ids[: first + 1])
        assert ex.meta["prompt"] == "ask" and prompt.startswith(tokenizer.decode(ask_prompt_ids(tokenizer, "x")[:5]))
        said = _flagged_text(tokenizer, ex).strip()
        assert said.endswith(f" is {ex.meta['answer']}.") and said.split(" is ")[0].split("[")[0] in ex.meta["definition"]
        assert ex.meta["answer"] not in prompt
    assert asked >= 3
    with pytest.raises(ValueError, match="synthetic_ask"):
        MixArgs(roots=[str(roots)], synthetic_ask=2)


def test_every_kind_fills_a_target_window_longer_than_a_memory_chunk(roots, tokenizer):
    # the GPU recipe's shape (target_len 512 > chunk_len 256): the batch is one (B, T + 1) tensor
    args = MixArgs(roots=[str(roots)], chunk_len=64, target_len=150, own_chunks=3, pool_code_chunks=2,
                   pool_filler_chunks=2)
    long_maker = ExampleMaker(Corpus(find_packages([roots]), tokenizer), args)
    rng = random.Random(9)
    for make in (long_maker.passkey, long_maker.synthetic):
        for _ in range(3):
            _check_shapes(make(rng), args)


def test_examples_are_deterministic_per_seed(maker):
    a = [maker.example(random.Random("s:1")) for _ in range(3)]
    b = [maker.example(random.Random("s:1")) for _ in range(3)]
    assert [(x.kind, x.ids, x.memory) for x in a] == [(x.kind, x.ids, x.memory) for x in b]


def test_data_workers_make_the_same_batches(maker):
    from finetune.retrieval_train import StepBatches, step_batch

    batches = StepBatches(maker, 7, 2, 1, maker.args, maker.tok)
    try:
        for step in (0, 1, 2):
            got, want = batches.get(step), step_batch(maker, 7, step, 2)
            assert [(e.kind, e.ids, e.memory) for e in got] == [(e.kind, e.ids, e.memory) for e in want]
    finally:
        batches.close()


# ---------------------------------------------------------------------------------------------
# Memory with gradient


def _tiny(seed=0, **over):
    from helpers_models import make_tiny

    return make_tiny(seed, **{"tie_word_embeddings": False, "max_position_embeddings": 128, "last_context_length": 64,
                              "mem_layers": [0, 1], **over})


def test_memory_from_projection_inputs_equals_encode_memory():
    from finetune.retrieval_train import encode_inputs, memory_from_inputs

    model = _tiny()
    chunks = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [], [20, 21, 22, 23, 24, 25]]  # padding, an empty chunk
    enc = encode_inputs(model, chunks, 6, pad_id=0)
    mem = memory_from_inputs(model, enc, rows=2)  # rows: chunks 0-1, chunks 2-3
    for row, pair in enumerate((chunks[:2], chunks[2:])):
        for layer, cache in mem.items():
            got_k, mask = cache.keys[row], cache.mask[row, 0, :, 0]
            for j, c in enumerate(pair):
                sl = slice(6 * j, 6 * j + 6)
                visible = mask[sl] == 0
                assert int(visible.sum()) == len(c)
                if c:
                    ref = model.encode_memory(torch.tensor([c]))[layer]
                    torch.testing.assert_close(got_k[:, sl][:, visible], ref.keys[0], atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(cache.values[row][:, sl][:, visible], ref.values[0], atol=1e-5,
                                               rtol=1e-5)


def test_chunks_encoded_after_their_context_are_the_joint_encodings_slots():
    """encode_inputs(contexts=...) then memory_from_inputs: each chunk's keys/values are its own slots of
    its context and the chunk encoded together (what the index stores); no context: the chunk alone."""
    from finetune.retrieval_train import encode_inputs, memory_from_inputs

    model = _tiny()
    chunks = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [], [20, 21, 22, 23, 24, 25]]
    contexts = [[30, 31, 32, 33, 34], [], [40, 41], [50, 51]]  # the empty chunk's context is ignored
    mem = memory_from_inputs(model, encode_inputs(model, chunks, 6, pad_id=0, contexts=contexts), rows=2)
    pairs_all = list(zip(chunks, contexts, strict=True))
    for row, pairs in enumerate((pairs_all[:2], pairs_all[2:])):
        for layer, cache in mem.items():
            mask = cache.mask[row, 0, :, 0]
            for j, (c, ctx) in enumerate(pairs):
                sl = slice(6 * j, 6 * j + 6)
                visible = mask[sl] == 0
                assert int(visible.sum()) == len(c)
                if c:
                    ref = model.encode_memory(torch.tensor([ctx + c]))[layer]
                    torch.testing.assert_close(cache.keys[row][:, sl][:, visible], ref.keys[0][:, len(ctx):],
                                               atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(cache.values[row][:, sl][:, visible], ref.values[0][:, len(ctx):],
                                               atol=1e-5, rtol=1e-5)
    alone = memory_from_inputs(model, encode_inputs(model, chunks, 6, pad_id=0), rows=2)
    assert not torch.allclose(alone[1].keys[0, :, :6], mem[1].keys[0, :, :6], atol=1e-3)  # layer 1 sees it


def test_memory_contexts_are_the_ids_before_each_chunk_in_its_file(roots, tokenizer):
    """memory_context=N: a repo chunk's context is the N ids before it in its file, synthetic and pool
    chunks come after the code before them, passkey chunks after filler; the chunks themselves (and the
    rest of a repo example) are those of memory_context=0, whose examples carry no contexts."""
    corpus = Corpus(find_packages([roots]), tokenizer)

    def make(n):
        return ExampleMaker(corpus, MixArgs(roots=[str(roots)], chunk_len=64, target_len=112, own_chunks=3,
                                            same_repo_chunks=1, memory_context=n, pool_code_chunks=2,
                                            pool_filler_chunks=2))

    plain, after = make(0).repo(random.Random(1)), make(16).repo(random.Random(1))
    assert plain.contexts == [] or all(c == [] for c in plain.contexts)
    assert after.memory == plain.memory and after.ids == plain.ids and after.weights == plain.weights
    files = [corpus.info(p, f).ids for p in corpus.packages for f in p.files if corpus.info(p, f) is not None]

    def follows(ctx, chunk):  # ctx + chunk is a run of some file's ids, ctx all the ids before (<= 16)
        run = ctx + chunk
        return any(ids[i:i + len(run)] == run and (len(ctx) == 16 or i == 0)
                   for ids in files for i in range(len(ids) - len(run) + 1))

    assert len(after.contexts) == len(after.memory) and any(after.contexts)
    assert all(follows(ctx, c) for ctx, c in zip(after.contexts, after.memory, strict=True))
    rng = random.Random(3)
    syn, key = make(16).synthetic(rng), make(16).passkey(rng)
    assert [len(c) for c in syn.contexts] == [16] * 3 and len(key.contexts) == 3
    assert all(len(c) == 16 for c in key.contexts)  # (a chunk that starts with the task sentence: none)
    chunks, repeat, contexts = make(16).pool(random.Random(2))
    assert len(chunks) == len(repeat) == len(contexts) == 4 and all(len(c) == 16 for c in contexts)
    assert all(follows(ctx, c) for ctx, c in list(zip(contexts, chunks, strict=True))[:2])
    with pytest.raises(ValueError, match="memory_context"):
        MixArgs(roots=[str(roots)], memory_context=-1)


def test_memory_context_chars_cuts_repo_contexts_as_the_index_does(roots, tokenizer):
    """memory_context_chars=N: a repo chunk's context is the text before it in its file, at most N
    characters from a line start (indexer.encoder.contexts' rule), tokenized alone; synthetic, passkey
    and pool examples are memory_context=0's (no context, the same draws)."""
    corpus = Corpus(find_packages([roots]), tokenizer)

    def make(**kw):
        return ExampleMaker(corpus, MixArgs(roots=[str(roots)], chunk_len=64, target_len=112, own_chunks=3,
                                            same_repo_chunks=1, pool_code_chunks=2, pool_filler_chunks=2, **kw))

    cut = 120
    plain, after = make().repo(random.Random(1)), make(memory_context_chars=cut).repo(random.Random(1))
    assert after.memory == plain.memory and after.ids == plain.ids and after.weights == plain.weights
    infos = [fi for fi in (corpus.info(p, f) for p in corpus.packages for f in p.files) if fi is not None]

    def cut_before(text, fi, i):  # text is what the index would encode before the chunk at fi.ids[i:]
        before = fi.text[:fi.offsets[i][0]]
        longest_line = max(len(line) + 1 for line in before[-cut - 1:].split("\n"))
        return (before.endswith(text) and len(text) <= cut
                and (len(text) == len(before) or before[-len(text) - 1] == "\n")  # from a line start
                and len(text) >= min(len(before), cut) - longest_line)  # the longest such tail

    for ctx, chunk in zip(after.contexts, after.memory, strict=True):
        text = tokenizer.decode(ctx)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ctx  # tokenized alone
        assert any(cut_before(text, fi, i) for fi in infos for i in range(len(fi.ids))
                   if fi.ids[i:i + len(chunk)] == chunk)  # (a chunk's ids may occur in several places)
    assert any(after.contexts)
    for draw in ("synthetic", "passkey", "pool"):
        a, b = getattr(make(), draw)(random.Random(5)), getattr(make(memory_context_chars=cut), draw)(random.Random(5))
        assert a == b, draw
    with pytest.raises(ValueError, match="not both"):
        MixArgs(roots=[str(roots)], memory_context=16, memory_context_chars=cut)


def test_batch_loss_gradient_reaches_memory_key_value_projections(maker):
    from finetune.retrieval_train import batch_loss, encode_inputs

    model = _tiny(vocab_size=len(maker.tok))
    for p in model.parameters():
        p.requires_grad_(False)
    att = model.model.layers[0].self_attn
    for lin in (att.q_proj, att.k_proj, att.v_proj):
        lin.weight.requires_grad_(True)
    rng = random.Random(0)
    batch = [maker.passkey(rng), maker.synthetic(rng)]
    pool = encode_inputs(model, [maker.filler_chunk(rng)], maker.args.chunk_len, 0)
    loss, stats = batch_loss(model, batch, pool, [3], maker.args.chunk_len, 0)
    loss.backward()
    for lin in (att.q_proj, att.k_proj, att.v_proj):
        assert lin.weight.grad is not None and float(lin.weight.grad.abs().sum()) > 0
    assert stats["passkey_n"] > 0 and 0 <= stats["passkey_acc"] <= 1


def test_batch_loss_with_the_servers_sparse_selection_trains_through_the_selected_blocks(maker):
    """mem_budget set (the server's memory.selectTokens, via [model] config_overrides): the loss is
    that of attention to the top blocks only (it differs from dense), and gradient still reaches the
    memory layers' k/v projections, through the rows selection kept."""
    from finetune.retrieval_train import batch_loss, encode_inputs

    model = _tiny(vocab_size=len(maker.tok))
    rng = random.Random(0)
    batch = [maker.passkey(rng), maker.synthetic(rng)]
    pool = encode_inputs(model, [maker.filler_chunk(rng) for _ in range(4)], maker.args.chunk_len, 0)
    dense, _ = batch_loss(model, batch, pool, [3] * 4, maker.args.chunk_len, 0)
    model.config.mem_block_size, model.config.mem_budget = 8, 16  # 2 blocks of the ~100 in memory
    att = model.model.layers[model.config.mem_layers[0]].self_attn
    model.zero_grad()
    sparse, _ = batch_loss(model, batch, pool, [3] * 4, maker.args.chunk_len, 0)
    sparse.backward()
    assert abs(float(sparse) - float(dense)) > 1e-4
    for lin in (att.k_proj, att.v_proj):
        assert lin.weight.grad is not None and float(lin.weight.grad.abs().sum()) > 0


def _saved_tiny(path: Path, tokenizer) -> Path:
    """A tiny model with the test tokenizer's vocabulary, saved as a full checkpoint (a training base)."""
    from finetune.config import RunConfig
    from finetune.outputs import save_output

    model = _tiny(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    save_output(model, tokenizer, RunConfig(), path, None, "full")
    return path


def test_plain_loss_is_the_no_memory_nll_and_ignores_padding():
    from finetune.retrieval_train import plain_loss

    model = _tiny()
    a, b = [5, 6, 7, 8, 9, 10, 11], [20, 21, 22, 23]
    logits = model(torch.tensor([a])).logits[0, :-1]
    want_a = torch.nn.functional.cross_entropy(logits, torch.tensor(a[1:]), reduction="none")
    logits = model(torch.tensor([b])).logits[0, :-1]
    want_b = torch.nn.functional.cross_entropy(logits, torch.tensor(b[1:]), reduction="none")
    got = plain_loss(model, [a, b], pad_id=0)  # b is padded to a's length: its padding is not scored
    torch.testing.assert_close(got, torch.cat([want_a, want_b]).mean(), atol=1e-5, rtol=1e-5)


def test_the_guard_term_trains_the_memory_layers_on_plain_code(tmp_path, tokenizer, maker):
    """lm_weight > 0 adds the plain windows' no-memory NLL to the loss: the update differs from the
    same step without it, and metrics.jsonl logs it (lm_nll) beside the unchanged retrieval loss."""
    import dataclasses

    from safetensors.torch import load_file

    from finetune.config import ModelArgs
    from finetune.retrieval_train import RetrievalConfig, RetrievalTrainArgs, train_retrieval

    base = _saved_tiny(tmp_path / "base", tokenizer)
    runs = {}
    for weight in (0.0, 5.0):
        mix = dataclasses.replace(maker.args, lm_rows=2, lm_len=48, lm_weight=weight)
        cfg = RetrievalConfig(ModelArgs(path=str(base), train="memory"), mix,
                              RetrievalTrainArgs(out_dir=str(tmp_path / f"w{weight}"), steps=1, batch_size=2,
                                                 lr=1e-2, save_every=0, warmup_steps=0))
        _, run, _ = train_retrieval(cfg, maker=ExampleMaker(maker.corpus, mix), progress=False)
        runs[weight] = (json.loads((run / "metrics.jsonl").read_text()), load_file(str(run / "adapter.safetensors")))
    (rec0, delta0), (rec5, delta5) = runs[0.0], runs[5.0]
    assert rec0["loss"] == pytest.approx(rec5["loss"]) and rec0["lm_nll"] == pytest.approx(rec5["lm_nll"])
    assert rec5["lm_nll"] > 0
    assert any(not torch.allclose(delta0[k], delta5[k]) for k in delta0)  # the term moved the weights


def test_training_checkpoints_resume_and_delta(tmp_path, roots, tokenizer, maker):
    from safetensors.torch import load_file

    from finetune.config import ModelArgs
    from finetune.outputs import load_trained
    from finetune.retrieval_train import RetrievalConfig, RetrievalTrainArgs, train_retrieval

    base = _saved_tiny(tmp_path / "base", tokenizer)

    def cfg(out, steps, resume=None):
        return RetrievalConfig(ModelArgs(path=str(base), train="memory"), maker.args,
                               RetrievalTrainArgs(out_dir=str(out), steps=steps, batch_size=2, lr=1e-2,
                                                  save_every=1, resume=resume, warmup_steps=0))

    _, run, state = train_retrieval(cfg(tmp_path / "full", 3), maker=maker, progress=False)
    assert state["step"] == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-000000{i}" for i in (1, 2, 3)]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    _, run2, _ = train_retrieval(cfg(tmp_path / "part", 2), maker=maker, progress=False)
    _, run2, _ = train_retrieval(cfg(tmp_path / "part", 3, resume="latest"), maker=maker, progress=False)
    a, b = load_file(str(run / "adapter.safetensors")), load_file(str(run2 / "adapter.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k])  # resumed == uninterrupted
    trained, _ = load_trained(run / "checkpoints" / "step-0000002" / "delta")
    start = load_file(str(base / "model.safetensors"))
    k = next(iter(a))
    assert not torch.equal(trained.state_dict()[k], start[k])  # the delta changed the memory layers
    assert json.loads((run / "adapter.json").read_text())["mem_layers"] == [0, 1]


def test_training_every_tensor_checkpoints_and_writes_a_full_checkpoint(tmp_path, tokenizer, maker):
    """model.train = 'all' saves resumable checkpoints (no per-checkpoint delta: every tensor changed)
    and ends with a full checkpoint that loads; it used to fail at its first checkpoint."""
    from finetune.config import ModelArgs
    from finetune.outputs import load_trained
    from finetune.retrieval_train import RetrievalConfig, RetrievalTrainArgs, train_retrieval
    from longllama_lsp.model import LongLlamaForCausalLM

    base = _saved_tiny(tmp_path / "base", tokenizer)
    cfg = RetrievalConfig(ModelArgs(path=str(base), train="all"), maker.args,
                          RetrievalTrainArgs(out_dir=str(tmp_path / "all"), steps=2, batch_size=2, lr=1e-2,
                                             save_every=1, warmup_steps=0))
    _, run, state = train_retrieval(cfg, maker=maker, progress=False)
    assert state["step"] == 2
    ckpt = run / "checkpoints" / "step-0000002"
    assert (ckpt / "trainable.safetensors").is_file() and not (ckpt / "delta").exists()
    trained, _ = load_trained(run)
    start = LongLlamaForCausalLM.from_pretrained(base).state_dict()
    changed = [k for k, v in trained.state_dict().items() if k in start and not torch.equal(v, start[k])]
    assert any(".mlp." in k for k in changed)  # beyond the memory layers' attention


def test_training_lora_on_every_layer_resumes_and_writes_a_delta(tmp_path, tokenizer, maker):
    """model.train = 'lora' (adapters on every layer): the forward passes reach the adapters inside
    the PEFT-wrapped model, a resumed run equals an uninterrupted one, and the delta it writes loads
    on the base and changes layers beyond the memory layers. Retrieval training refused LoRA before.
    The base carries an adapter (as the bundled model carries the shipped memory delta): the delta is
    relative to the base as loaded, adapter applied (as every delta is applied after it), so the weight
    that adapter changed gets low-rank pairs like the others, not a merged copy (~425 MB from the bundled
    default on SmolLM2), and the delta rebuilds the model."""
    from safetensors.torch import load_file, save_file

    from finetune.config import ModelArgs
    from finetune.outputs import load_trained, trained_state_dict
    from finetune.retrieval_train import RetrievalConfig, RetrievalTrainArgs, train_retrieval

    base = _saved_tiny(tmp_path / "base", tokenizer)
    shipped, paired = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"
    weights = load_file(str(base / "model.safetensors"))
    out_f, in_f = weights[paired].shape
    save_file({shipped: torch.randn_like(weights[shipped]),
               paired + ".lora_down": torch.randn(2, in_f) * 0.1, paired + ".lora_up": torch.randn(out_f, 2) * 0.1},
              str(base / "adapter.safetensors"))

    def cfg(out, steps, resume=None):
        margs = ModelArgs(path=str(base), train="lora", lora_layers="all", lora_r=4,
                          lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        return RetrievalConfig(margs, maker.args, RetrievalTrainArgs(out_dir=str(out), steps=steps, batch_size=2,
                                                                     lr=1e-2, save_every=1, resume=resume,
                                                                     warmup_steps=0))

    model, run, state = train_retrieval(cfg(tmp_path / "full", 2), maker=maker, progress=False)
    assert state["step"] == 2
    delta = load_file(str(run / "adapter.safetensors"))
    assert {shipped, paired}.isdisjoint(delta) and {shipped + ".lora_down", paired + ".lora_down"} <= delta.keys()
    assert delta[paired + ".lora_down"].shape[0] == 4  # the run's own pair (r = 4); the base's stays in the base
    assert "model.layers.1.self_attn.q_proj.weight.lora_down" in delta
    assert "model.layers.1.self_attn.q_proj.weight" not in delta
    train_retrieval(cfg(tmp_path / "part", 1), maker=maker, progress=False)
    _, run2, _ = train_retrieval(cfg(tmp_path / "part", 2, resume="latest"), maker=maker, progress=False)
    a = load_file(str(run / "checkpoints" / "step-0000002" / "trainable.safetensors"))
    b = load_file(str(run2 / "checkpoints" / "step-0000002" / "trainable.safetensors"))
    assert a.keys() == b.keys() and any(".lora_A." in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k])  # resumed == uninterrupted
    trained, _ = load_trained(run)
    want = trained_state_dict(model)
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(tensor, want[name], atol=1e-6, rtol=1e-5)
    start = load_file(str(base / "model.safetensors"))
    changed = {k for k, v in trained.state_dict().items() if k in start and not torch.equal(v, start[k])}
    assert any(".mlp." in k for k in changed)
    n_layers = trained.config.num_hidden_layers
    assert {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(n_layers)} <= changed


def test_a_lora_run_continues_a_lora_delta_as_adapters_and_stays_low_rank(tmp_path, tokenizer, maker):
    """model.path = an earlier LoRA run's delta: its pairs start the new adapters (not merged into the
    weights, which made the next delta a full replacement of every adapted weight, ~400 MB on
    SmolLM2), so the new delta is pairs again and, before any step, rebuilds the earlier model."""
    from safetensors.torch import load_file

    from finetune.config import ModelArgs
    from finetune.outputs import load_trained
    from finetune.retrieval_train import RetrievalConfig, RetrievalTrainArgs, train_retrieval

    base = _saved_tiny(tmp_path / "base", tokenizer)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def cfg(path, out, steps, lr):
        margs = ModelArgs(path=str(path), train="lora", lora_layers="all", lora_r=4, lora_targets=targets)
        return RetrievalConfig(margs, maker.args, RetrievalTrainArgs(out_dir=str(out), steps=steps, batch_size=2,
                                                                     lr=lr, save_every=0, warmup_steps=0))

    _, first, _ = train_retrieval(cfg(base, tmp_path / "first", 2, 1e-2), maker=maker, progress=False)
    _, again, _ = train_retrieval(cfg(first, tmp_path / "again", 1, 0.0), maker=maker, progress=False)
    a, b = load_file(str(first / "adapter.safetensors")), load_file(str(again / "adapter.safetensors"))
    assert a.keys() == b.keys() and any(k.endswith(".lora_down") for k in b)  # pairs, not replacements
    want, _ = load_trained(first)
    got, _ = load_trained(again)
    for name, tensor in got.state_dict().items():
        torch.testing.assert_close(tensor, want.state_dict()[name], atol=1e-6, rtol=1e-5)
    _, more, _ = train_retrieval(cfg(first, tmp_path / "more", 1, 1e-2), maker=maker, progress=False)
    c = load_file(str(more / "adapter.safetensors"))
    assert c.keys() == a.keys() and any(not torch.equal(c[k], a[k]) for k in a)  # it trains on from there
    from safetensors.torch import save_file

    from longllama_lsp.errors import CheckpointError

    name = next(k for k in a if k.endswith(".lora_down"))
    save_file({**a, name: torch.zeros(4, a[name].shape[1] + 1)}, str(first / "adapter.safetensors"))
    with pytest.raises(CheckpointError, match="adapter does not fit the model: low-rank pairs"):  # said, not a crash
        train_retrieval(cfg(first, tmp_path / "bad", 1, 1e-2), maker=maker, progress=False)


# ---------------------------------------------------------------------------------------------
# Skill eval


@pytest.fixture(scope="module")
def eval_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout") / "geom"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "shapes.py").write_text(SHAPES)
    (root / "draw.py").write_text(DRAW)
    (root / "colors.py").write_text(COLORS)
    (root / "geom-1.0.dist-info").mkdir()
    (root / "geom-1.0.dist-info" / "skip.py").write_text("Polygon = 1\n")
    (root / ".gitignore").write_text("generated.py\n")  # the walker's rules (finetune.data.collect_files) apply
    (root / "generated.py").write_text("Polygon = 2\n")
    return root


def test_crossfile_eval_scores_the_same_tokens_under_every_system(eval_repo, tokenizer):
    from finetune.skill_eval import SkillArgs, eval_crossfile, load_repo, memory_files, pick_spans

    repo = load_repo(eval_repo, tokenizer)
    assert sorted(repo.files) == ["__init__.py", "colors.py", "draw.py", "shapes.py"]  # no dist-info, no ignored file
    assert repo.files["draw.py"].names == {"Polygon", "make_square", "RED_TONE", "area"}
    assert memory_files(repo, "draw.py", 10_000, 0) == ["shapes.py", "__init__.py", "colors.py"]  # imported first
    args = SkillArgs(budget=96, span_len=32, chunk_len=32, memory_tokens=4096, files_per_repo=None,
                     spans_per_file=2, batch_size=2)
    spans = pick_spans(repo, args)
    assert spans and all(s.path == "draw.py" for s in spans)
    model = _tiny(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = eval_crossfile(model, tokenizer, [repo], args, progress=False)
    n = {s: v["xid_tokens"] for s, v in out["systems"].items()}
    assert n["none"] == n["memory"] == n["retrieved"] == n["knn"] == n["bm25"] == \
        sum(sum(repo.files[s.path].flags[s.start:s.end]) for s in spans)
    draw = repo.files["draw.py"]  # a name's first token: one per use of a cross-file name (imports are not uses)
    uses = [ln for ln in DRAW.splitlines() if not ln.startswith("from ")]
    assert sum(draw.starts) == sum(len(re.findall(rf"\b{n}\b", ln)) for n in draw.names for ln in uses) == 12
    firsts = {s: v["xid_first_tokens"] for s, v in out["systems"].items()}
    assert set(firsts.values()) == {sum(sum(draw.starts[s.start:s.end]) for s in spans)}
    assert 0 < firsts["none"] < n["none"]
    assert out["systems"]["memory"]["xid_first_nll"] != out["systems"]["none"]["xid_first_nll"]
    assert out["systems"]["memory"]["xid_nll"] != out["systems"]["none"]["xid_nll"]  # memory is used
    assert out["systems"]["retrieved"]["xid_nll"] != out["systems"]["none"]["xid_nll"]
    assert out["systems"]["knn"]["xid_nll"] != out["systems"]["retrieved"]["xid_nll"]  # the lookup is mixed in
    assert out["memory_tokens_mean"] > 0 and 0 < out["retrieved_tokens_mean"] <= args.retrieve_tokens


def test_the_eval_encodes_memory_chunks_after_their_context_as_the_index_does(tokenizer):
    """MemoryCache(context=N): each chunk's memory is its own slots of the N tokens before it and the chunk
    encoded together (the first chunk of an item after `before`); context 0 encodes each chunk alone."""
    import torch

    from finetune.evaluate import MemoryCache

    model = _tiny(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).eval()
    ids = tokenizer.encode(SHAPES, add_special_tokens=False)[:80]
    after, alone = MemoryCache(model, 32, 4, progress=False, context=16), MemoryCache(model, 32, 4, progress=False)
    after.ensure({"file": ids[20:], "chunk": ids[40:72]}, {"chunk": ids[:40]})
    alone.ensure({"file": ids[20:]})
    with torch.no_grad():
        joint = model.encode_memory(torch.tensor([ids[20 + 32 - 16:20 + 64]]))  # the file's 2nd chunk, after 16
        first = model.encode_memory(torch.tensor([ids[20:52]]))
        chunk = model.encode_memory(torch.tensor([ids[40 - 16:72]]))
    for layer in joint:
        got = after.get("file")[layer].keys  # (1, Hkv, 60, D): chunks of 32 + 28
        assert got.shape[2] == 60
        assert torch.allclose(got[:, :, :32], first[layer].keys, atol=1e-5)  # the first chunk: no context
        assert torch.allclose(got[:, :, 32:], joint[layer].keys[:, :, 16:], atol=1e-5)
        assert torch.allclose(after.get("chunk")[layer].keys, chunk[layer].keys[:, :, 16:], atol=1e-5)
    # layer 0's keys see only their token; layer 1's see the context through layer 0's attention
    assert not torch.allclose(alone.get("file")[1].keys[:, :, 32:], after.get("file")[1].keys[:, :, 32:], atol=1e-3)


def test_retrieved_memory_is_the_other_files_chunks_that_match_the_code_before_the_span(eval_repo, tokenizer):
    from finetune.skill_eval import SkillArgs, Span, chunk_ids, load_repo, retrieved_chunks
    from longllama_lsp.lexical import ChunkRetriever

    repo = load_repo(eval_repo, tokenizer)
    f = repo.files["draw.py"]
    span = Span("geom", "draw.py", len(f.ids) - 10, len(f.ids) - 5)
    args = SkillArgs(chunk_len=32, retrieve_tokens=32)
    keys = retrieved_chunks(repo, span, args, tokenizer, ChunkRetriever())
    assert len(keys) == 1 and keys[0][1] != "draw.py"  # one chunk fits; never the file itself
    text = tokenizer.decode(chunk_ids(repo, keys[0], 32))
    assert {"Polygon", "make_square", "RED_TONE"} & set(text.replace("(", " ").replace(":", " ").split())
    args.retrieve_tokens = 10_000
    keys = retrieved_chunks(repo, span, args, tokenizer, ChunkRetriever())
    assert {k[1] for k in keys} == {"shapes.py", "colors.py"}  # __init__.py (empty) shares no name


def test_bm25_prompt_pastes_other_files_within_the_budget(eval_repo, tokenizer):
    from finetune.skill_eval import Span, _retrieval_module, bm25_prompt, load_repo

    repo = load_repo(eval_repo, tokenizer)
    retrieval = _retrieval_module()
    index = retrieval.SnippetIndex(repo.root, sorted(repo.files))
    f = repo.files["draw.py"]
    start = len(f.ids) - 10
    ids = bm25_prompt(repo, Span("geom", "draw.py", start, start + 5), 200, tokenizer, index, retrieval)
    text = tokenizer.decode(ids)
    assert len(ids) <= 200
    assert "# Path: colors.py" in text or "# Path: shapes.py" in text  # a file defining names used here
    assert "# Path: draw.py" not in text  # never the file itself
    assert text.endswith(tokenizer.decode(f.ids[start - 5:start]))  # the in-file prefix comes last


def test_bos_less_tokenizer_starts_every_file_with_eos(eval_repo, roots):
    """Qwen2 has no BOS: files start with EOS in the skill eval and the retrieval data, as in
    finetune.data.encode_document (no None ids)."""
    from helpers_tokenizer import family_tokenizer

    from finetune.data import encode_document
    from finetune.skill_eval import load_repo

    tok = family_tokenizer("qwen2")
    eos = tok.eos_token_id
    assert tok.bos_token_id is None and encode_document(tok, "x = 1\n")[0][0] == eos
    f = load_repo(eval_repo, tok).files["draw.py"]
    assert f.ids[0] == f.ids[-1] == eos and None not in f.ids
    geom = next(p for p in find_packages([roots]) if p.name == "geom")
    info = Corpus([geom], tok).info(geom, "geom/draw.py")
    assert info.ids[0] == info.ids[-1] == eos and None not in info.ids


def test_passkey_bag_encodes_each_distinct_chunk_once(tokenizer):
    from finetune.evaluate import MemoryCache
    from finetune.skill_eval import SkillArgs, eval_passkey

    model = _tiny(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cache = MemoryCache(model, 32, progress=False)
    chunks = [(5, 6, 7), (8, 9), (5, 6, 7)]
    cache.ensure({c: list(c) for c in chunks})
    mem = cache.memory(chunks)
    assert cache.encoded_tokens == 5 and mem.num_tokens == 8
    # Whole blocks: a repeated chunk's blocks carry one content's ids (sparse attention reads one copy).
    size = model.config.mem_block_size
    a, b = tuple(range(10, 10 + size)), tuple(range(50, 50 + 2 * size))
    cache.ensure({c: list(c) for c in (a, b)})
    ids = cache.memory([a, b, a, b])[model.config.mem_layers[0]].block_ids.ids
    assert ids[0] == ids[3] and ids[1:3].tolist() == ids[4:6].tolist() and len(set(ids.tolist())) == 3
    args = SkillArgs(passkey_lengths=(512, 2048), passkey_trials=3, chunk_len=32, local_len=48, memory_context=0)
    out = eval_passkey(model, tokenizer, args, progress=False)
    assert out["512"]["trials"] == out["2048"]["trials"] == 3
    assert out["encoded_tokens"] < (512 + 2048) * 3 / 2  # the filler repeats: few distinct chunks
    # after their contexts (the index's encoding), chunks of repeated filler after repeated filler repeat too
    args.memory_context = 32
    with_context = eval_passkey(model, tokenizer, args, progress=False)["encoded_tokens"]
    assert out["encoded_tokens"] < with_context < 2 * (512 + 2048) * 3 / 2
    # With a local window longer than the prompt, nothing is in memory.
    out = eval_passkey(model, tokenizer, SkillArgs(passkey_lengths=(64,), passkey_trials=2, local_len=120),
                       progress=False)
    assert out["64"]["in_memory"] == 0


def test_passkey_trials_name_the_key_sentences_memory_slots(tokenizer):
    """bench/passkey_selection.py checks the selection against these slots: memory slot i is token i."""
    from finetune.evaluate import MemoryCache
    from finetune.skill_eval import SkillArgs, passkey_trials

    model = _tiny(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cache = MemoryCache(model, 64, progress=False)
    args = SkillArgs(passkey_trials=4, chunk_len=64)
    in_memory = 0
    for t in passkey_trials(model, tokenizer, cache, 1024, args, local=64):
        assert t.memory.num_tokens == t.split == t.prompt_tokens - t.window.shape[1]
        assert t.window[0].tolist() == t.ids[t.split:]
        text = tokenizer.decode(t.ids[t.key_at:t.key_end])
        assert text.strip().startswith(f"The pass key is {t.key}.") and text.endswith(f"{t.key} is the pass key.")
        in_memory += t.key_end <= t.split
    assert in_memory  # some trials' key sentence lies in memory, at those slots


def test_passkey_trials_in_the_users_prompt_styles(tokenizer):
    """--passkey-prompt ask|bare: memory = the filler and key alone (no task sentence, no question), the
    local window = ask's chat prompt or the question line (the two ways a user asks, which failed)."""
    from finetune.evaluate import MemoryCache
    from finetune.passkey import QUESTION, TASK
    from finetune.skill_eval import SkillArgs, passkey_trials
    from longllama_lsp.engine import ask_prompt_ids

    model = _tiny(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cache = MemoryCache(model, 64, progress=False)
    args = SkillArgs(passkey_trials=3, chunk_len=64)
    for style, local in (("ask", ask_prompt_ids(tokenizer, "What is the pass key?")),
                         ("bare", tokenizer(QUESTION)["input_ids"])):
        for t in passkey_trials(model, tokenizer, cache, 1024, args, local=64, style=style):
            assert t.window[0].tolist() == local and t.split == t.prompt_tokens == t.memory.num_tokens
            text = tokenizer.decode(t.ids)
            assert TASK not in text and "What is" not in text and t.key_end <= t.split
            assert tokenizer.decode(t.ids[t.key_at:t.key_end]).strip().startswith(f"The pass key is {t.key}.")


def test_key_digits_scores_near_misses():
    from finetune.skill_eval import PasskeyScore, key_digits

    assert key_digits("47178", "47177. The pass") == 0.8
    assert key_digits("48822", "48822.") == 1.0
    assert key_digits("3810", "33100.") == 0.75  # place by place: 3, 1, 0 (the extra digit does not count)
    assert key_digits("12345", "a key that is used to open a") == 0.0
    sc = PasskeyScore(16384, digits_in_memory=[0.8, 0.4])
    assert sc.summary()["key_digits_in_memory"] == pytest.approx(0.6)
    assert PasskeyScore(16384).summary()["key_digits_in_memory"] is None


def test_eval_cli_task_passkey_and_missing_repo(capsys):
    from longllama_lsp.cli import main

    rc = main(["eval", "--task", "passkey", "--model", str(RECALL), "--passkey-lengths", "128",
               "--passkey-trials", "1", "--local-len", "32", "--chunk-len", "32", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "passkey (local 32 tokens" in out and "memory attention: dense" in out
    rc = main(["eval", "--task", "passkey", "--model", str(RECALL), "--passkey-lengths", "128", "--passkey-prompt",
               "ask", "--passkey-trials", "1", "--chunk-len", "32", "--no-progress", "--json", "-"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["passkey"]["prompt"] == "ask"
    assert main(["eval", "--task", "crossfile-ids", "--model", str(RECALL)]) == 2
    assert "needs --repo" in capsys.readouterr().err
    assert main(["eval", "--model", str(RECALL)]) == 2


def test_eval_says_why_a_repository_has_no_cross_file_identifier(capsys, tmp_path, eval_repo):
    from longllama_lsp.cli import main

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("no code here\n")
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "a.py").write_text("from b import thing\n\nVALUE = 1\n")
    argv = ["eval", "--task", "crossfile-ids", "--model", str(RECALL), "--budget", "96", "--span-len", "32",
            "--chunk-len", "32", "--no-progress", "--repo"]
    assert main([*argv, str(tmp_path / "notes"), "--repo", str(tmp_path / "alone")]) == 0
    err = capsys.readouterr().err
    assert f"{tmp_path / 'notes'}: no Python files" in err
    assert f"{tmp_path / 'alone'}: one Python file only" in err
    (tmp_path / "alone" / "c.py").write_text("import os\n")
    assert main([*argv, str(tmp_path / "alone")]) == 0
    assert "none of its 2 Python files uses a name that another of them defines" in capsys.readouterr().err
    assert main([*argv, str(eval_repo)]) == 0 and "longllama eval:" not in capsys.readouterr().err


def test_eval_select_tokens_runs_the_sparse_path(capsys, monkeypatch):
    """`--select-tokens N` attends to the top blocks within N memory tokens, as the server does."""
    from longllama_lsp.cli import main
    from longllama_lsp.model import attention

    calls = []
    real = attention._attend_sparse
    monkeypatch.setattr(attention, "_attend_sparse", lambda *a, **k: calls.append(1) or real(*a, **k))
    argv = ["eval", "--task", "passkey", "--model", str(RECALL), "--passkey-lengths", "256", "--passkey-trials",
            "1", "--local-len", "32", "--chunk-len", "32", "--no-progress"]
    assert main(argv) == 0 and not calls  # dense by default
    assert main([*argv, "--select-tokens", "32"]) == 0
    assert calls and "memory attention: top blocks within 32 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        main([*argv, "--select-tokens", "-5"])
    assert bad.value.code == 2 and "at least 0" in capsys.readouterr().err


def test_shipped_recipes_load_and_dispatch(tmp_path):
    from finetune.config import TRAIN_MODES
    from finetune.retrieval_train import RetrievalConfig, is_retrieval_recipe
    from longllama_lsp.model import LongLlamaConfig

    configs = Path(__file__).parents[1] / "finetune" / "configs"
    for name in ("retrieval-cpu.toml", "retrieval-cpu-ask.toml", "retrieval-cpu-context.toml", "retrieval-gpu.toml",
                 "retrieval-gpu-short.toml"):
        assert is_retrieval_recipe(configs / name)
        cfg = RetrievalConfig.load(configs / name, ["train.steps=3"])
        assert cfg.train.steps == 3 and cfg.model.train in TRAIN_MODES
        config = LongLlamaConfig(**cfg.model.config_overrides)  # a misspelt field would be ignored silently
        assert all(getattr(config, k) == v for k, v in cfg.model.config_overrides.items())
        assert all(k in LongLlamaConfig().to_dict() for k in cfg.model.config_overrides)
    assert not is_retrieval_recipe(configs / "default-memory.toml")  # FoT recipes keep their trainer
    bad = tmp_path / "bad.toml"
    bad.write_text("[retrieval]\nmix = { repo = 1.0, poetry = 1.0 }\n")
    with pytest.raises(ValueError, match="retrieval.mix"):
        RetrievalConfig.load(bad)


def test_the_retrieval_probe_takes_out_exactly_the_chunk_that_holds_the_answer(maker, tokenizer):
    """bench/retrieval_probe.py's "decoys" condition: the example without the chunk holding the
    definition or key (the others unchanged), "alone": only that chunk, "none": every chunk empty."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from retrieval_probe import answer_slot, variant

    rng = random.Random(7)
    for ex in [maker.synthetic(rng) for _ in range(6)] + [maker.passkey(rng) for _ in range(3)]:
        slot = answer_slot(ex, tokenizer)
        needle = ex.meta.get("definition", "").split("\n")[0] or ex.meta["key"]
        assert needle in tokenizer.decode(ex.memory[slot])
        decoys = variant(ex, "decoys", tokenizer).memory
        assert decoys[slot] == [] and all(needle not in tokenizer.decode(c) for c in decoys)
        assert [c for i, c in enumerate(decoys) if i != slot] == [c for i, c in enumerate(ex.memory) if i != slot]
        alone = variant(ex, "alone", tokenizer).memory
        assert alone[slot] == ex.memory[slot] and sum(c != [] for c in alone) == 1
        assert all(c == [] for c in variant(ex, "none", tokenizer).memory) and variant(ex, "memory", tokenizer) is ex


def test_copy_weights_raise_what_only_memory_holds():
    from finetune.retrieval_data import copy_weights

    memory = [[7, 8, 10, 11, 12, 13]]
    ids = [0, 10, 11, 12, 13, 5, 10, 11, 12, 13]  # the run 10..13 twice: memory, then the window itself
    w = copy_weights(ids, memory, [1.0] * 9, 3, 4.0)
    assert w == [1.0, 1.0, 4.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # targets 12 and 13 the first time only
    assert copy_weights(ids, memory, [3.0] * 9, 3, 2.0) == [3.0] * 9  # never lowers a weight


def test_xid_weights_single_out_each_names_first_token():
    from finetune.retrieval_data import xid_weights

    flags = [True, True, False, True, True, True, False, False, True]  # flags[0]: the token before the targets
    assert xid_weights(flags, 3.0, 0.0) == [3.0, 1.0, 3.0, 3.0, 3.0, 1.0, 1.0, 3.0]
    # a name running on from before the window has no first token in it
    assert xid_weights(flags, 3.0, 8.0) == [3.0, 1.0, 8.0, 3.0, 3.0, 1.0, 1.0, 8.0]
    held = [False, False, False, False, False, False, False, False, True]  # only the last name is in memory
    assert xid_weights(flags, 3.0, 8.0, held) == [3.0, 1.0, 3.0, 3.0, 3.0, 1.0, 1.0, 8.0]


def _reweighted_repo_example(roots, tokenizer, **weights):
    """The same repo example without and with `weights` (MixArgs fields: off, on values) and the target
    positions whose weight changed; the stream (ids, memory, flags) must not change."""
    corpus = Corpus(find_packages([roots]), tokenizer)

    def example(which: int):
        args = MixArgs(roots=[str(roots)], chunk_len=128, target_len=112, own_chunks=3,
                       **{k: v[which] for k, v in weights.items()})
        return ExampleMaker(corpus, args).repo(random.Random(1))

    off, on = example(0), example(1)
    assert (on.ids, on.memory, on.flags) == (off.ids, off.memory, off.flags)
    return off, on, [j for j, (a, b) in enumerate(zip(off.weights, on.weights, strict=True)) if a != b]


def test_repo_examples_weight_first_tokens_and_keep_the_stream(roots, tokenizer):
    off, on, raised = _reweighted_repo_example(roots, tokenizer, xid_first_weight=(0.0, 9.0))
    starts = [j for j, f in enumerate(on.flags) if f and (j == 0 or not on.flags[j - 1])]
    assert raised and set(raised) <= set(starts) and all(on.weights[j] == 9.0 for j in raised)
    assert all(on.weights[j] == MixArgs().xid_weight for j, f in enumerate(on.flags) if f and j not in raised)
    with pytest.raises(ValueError, match="xid_first_weight"):
        MixArgs(xid_first_weight=-1.0)
    # held only: the first tokens of names a memory chunk defines (a name defined in no chunk keeps xid_weight)
    corpus = Corpus(find_packages([roots]), tokenizer)
    kept = left = 0
    for seed in range(12):
        args = MixArgs(roots=[str(roots)], chunk_len=128, target_len=112, own_chunks=1, xid_first_weight=9.0,
                       xid_first_held_only=True)
        ex = ExampleMaker(corpus, args).repo(random.Random(seed))
        text = "\n".join(tokenizer.decode(c) for c in ex.memory)
        for j, f in enumerate(ex.flags):
            if f and (j == 0 or not ex.flags[j - 1]):
                name = tokenizer.decode(ex.ids[j + 1:j + 8]).strip().split("(")[0].split(".")[0].split()[0]
                defined = any(f"{k} {name}" in text for k in ("def", "class")) or f"{name} =" in text
                assert ex.weights[j] == (9.0 if defined else MixArgs().xid_weight) or not name.isidentifier()
                kept, left = kept + (ex.weights[j] == 9.0), left + (ex.weights[j] != 9.0)
    assert kept and left  # both kinds occur


def test_repo_examples_weight_copies_from_memory_and_keep_the_stream(roots, tokenizer):
    off, on, raised = _reweighted_repo_example(roots, tokenizer, copy_weight=(1.0, 5.0))
    assert raised and all(on.weights[j] == 5.0 for j in raised)
    grams = {tuple(c[i:i + 4]) for c in on.memory for i in range(len(c) - 3)}
    assert all(tuple(on.ids[j - 2:j + 2]) in grams for j in raised)
    assert all(w in (1.0, MixArgs().xid_weight) for w in off.weights)
