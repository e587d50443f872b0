"""memory.knnWeight: kNN-LM over a completion's memory (longllama_lsp/knn.py).

Test Data: a seeded tiny LongLLaMA + SmolLM2 tokenizer (tests/helpers_models.py) loaded by the engine's
worker; helpers_memory's repository (`limits.py` defines RETRY_LIMIT, the open file `upload.py` uses it, three
others define unrelated names) plus `chorus.py`, one comment of a single repeated word, written to tmp_path
and indexed by the real indexer.pipeline (SQLite store, tree-sitter chunks, MemoryBank).
"""

from __future__ import annotations

import pytest
import torch
from helpers_memory import RETRY_FILES, RETRY_OPEN, indexed_engine, visible_chunks, write_repository
from helpers_models import smol_tokenizer, smol_tokenizer_dir, tiny_model_dir, tiny_model_for  # noqa: F401

from longllama_lsp.knn import Datastore, QueryProbe

FILES = {**RETRY_FILES, "chorus.py": "# la" + " la" * 60 + "\n"}
OPEN = RETRY_OPEN
CHORUS = "from chorus import la\n\n# la"


@pytest.fixture
def repo_engine(tiny_model_dir, tmp_path):  # noqa: F811
    with indexed_engine(tiny_model_dir, write_repository(tmp_path, FILES, OPEN)) as (engine, repo):
        yield engine, repo, tmp_path


def test_mix_is_a_distribution_moved_toward_the_nearest_slots_next_tokens():
    states = torch.randn(50, 8)
    next_ids = torch.arange(50) % 10  # (N,) over a vocabulary of 12
    store = Datastore(states, next_ids)
    logits = torch.zeros(12)
    mixed = store.mix(logits, states[3], 0.3)
    assert torch.logsumexp(mixed, 0).item() == pytest.approx(0.0, abs=1e-5)
    assert mixed.argmax().item() == 3  # the query is row 3's state: its next token gets the most votes
    assert mixed[10:].exp().tolist() == pytest.approx([0.7 / 12] * 2, rel=1e-4)  # no slot votes for 10, 11
    assert torch.allclose(store.mix(logits, states[3], 0.0), torch.log_softmax(logits, 0))


@torch.no_grad()
def test_the_query_and_a_slot_are_the_same_numbers_in_the_same_order(smol_tokenizer):  # noqa: F811
    """A position decoded as a memory slot was encoded is its own nearest slot, at distance 0: the probe's
    query (key then value projection at the last memory layer) is laid out as the datastore's rows."""
    model = tiny_model_for(smol_tokenizer, mem_layers=[0, 1]).eval()
    ids = torch.tensor([smol_tokenizer("def shout(text):\n    return text.upper()")["input_ids"]])  # (1, T)
    store = Datastore.of(model.encode_memory(ids), torch.arange(ids.shape[1]), 1)
    probe = QueryProbe(model, 1)
    model(ids[:, :6])  # no memory: the same computation up to the memory layers as the encode's
    assert store.states.shape == (ids.shape[1], 2 * model.config.num_key_value_heads * model.config.head_dim)
    assert torch.allclose(probe.state(), store.states[5], atol=1e-5)
    assert not torch.allclose(store.states[4], store.states[5], atol=1e-3)


def test_next_ids_are_each_visible_slots_following_token(repo_engine):
    """A retrieved chunk's slots say the token after each of theirs (its last: unknown); a chunk retrieval left
    out says none."""
    engine, repo, root = repo_engine
    engine.options.retrieve_tokens = sum(len(repo.bank.chunk_slots(c)) for c in repo.bank.chunks_of("limits.py"))
    engine.complete(OPEN, len(OPEN), path=str(root / "upload.py"))
    asm = engine._assembler._last[1]
    checked = set()
    for cid, meta in repo.bank.resident().items():
        slots = repo.bank.chunk_slots(cid)
        got = asm.next_ids[slots.start:slots.stop].tolist()
        if meta.path == "limits.py":
            ids = engine.tokenizer(repo.chunk_text(meta), add_special_tokens=False)["input_ids"]
            assert got == ids[1:] + [-1]
        elif meta.path != "upload.py":
            assert set(got) == {-1}
        checked.add(meta.path)
    assert checked == set(FILES) | {"upload.py"}


def test_the_lookup_steers_each_step_to_the_tokens_memory_had_next(repo_engine):
    """Every slot of chorus.py's one chunk but its first and last is followed by " la": at weight 0.9 the kNN
    vote outweighs the tiny random model at every step, so the completion repeats " la" (the first generated
    token completes the typed "la": token healing, so 4 tokens add 3 words)."""
    engine, repo, root = repo_engine
    engine.options.retrieve_tokens = sum(len(repo.bank.chunk_slots(c)) for c in repo.bank.chunks_of("chorus.py"))
    path = str(root / "song.py")
    engine.options.max_tokens = 4
    engine.options.knn_weight = 0.0
    plain = engine.complete(CHORUS, len(CHORUS), path=path).text
    engine.options.knn_weight = 0.9
    steered = engine.complete(CHORUS, len(CHORUS), path=path)
    assert steered.text == " la la la"
    assert plain != steered.text
    assert steered.timings["knnTokens"] > 50


def test_a_memory_too_large_for_a_lookup_reads_no_chunk_text(repo_engine, monkeypatch):
    """Over knn.MAX_TOKENS visible slots (retrieval off on a large repository) there is no lookup, and no chunk
    text is read for one."""
    engine, repo, root = repo_engine
    engine.on_worker(lambda: None)  # behind the warm-up job indexing queued
    monkeypatch.setattr("longllama_lsp.knn.MAX_TOKENS", 10)
    engine.options.retrieve_tokens = 0
    reads = []
    read = repo.chunk_text
    monkeypatch.setattr(repo, "chunk_text", lambda meta: reads.append(meta.path) or read(meta))
    engine._assembler._token_ids.clear()
    done = engine.complete(OPEN, len(OPEN), path=str(root / "upload.py"))
    assert done.timings["knnTokens"] == 0 and done.memory_tokens > 10
    assert reads == []


@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_the_warm_up_keeps_chunk_ids_only_for_the_lookup(tiny_model_dir, tmp_path, weight):  # noqa: F811
    """Indexing's warm-up reads every chunk's text for retrieval; it keeps their token ids for the lookup's
    next_ids only while the lookup is on."""
    with indexed_engine(tiny_model_dir, write_repository(tmp_path, FILES, OPEN), knn_weight=weight) as (engine, _):
        engine.on_worker(lambda: None)  # behind the warm-up job indexing queued
        assert bool(engine._assembler._token_ids) == (weight > 0)


def test_answers_read_the_lookup_too(repo_engine):
    """`longllama ask` mixes in the same lookup over the memory its question retrieves (here chorus.py alone,
    the file it names: a named file gets half of retrieveTokens)."""
    engine, repo, _ = repo_engine
    chorus = sum(len(repo.bank.chunk_slots(c)) for c in repo.bank.chunks_of("chorus.py"))
    engine.options.retrieve_tokens = 2 * chorus
    engine.options.answer_max_tokens = 3
    engine.options.knn_weight = 0.0
    plain = engine.answer("What does chorus.py say?", memory=True)
    engine.options.knn_weight = 0.9
    steered = engine.answer("What does chorus.py say?", memory=True)
    assert {m.path for m in visible_chunks(engine, repo.bank)} == {"chorus.py"}
    assert steered.timings["knnTokens"] == chorus - 1  # its last slot's next token is unknown
    assert steered.text == "la la la" != plain.text


def test_token_ids_keep_the_recently_read_within_their_bound():
    """The chunk-id cache evicts the least recently read first and never holds more than its bound after a
    put; a warm-up asks has_room first, so it stops adding at the bound instead of evicting."""
    from longllama_lsp.assembly import TokenIds

    cache = TokenIds(limit=10)
    cache.put("a", [1, 2, 3, 4])
    cache.put("b", [5, 6, 7, 8])
    assert cache.has_room()
    assert cache.get("a") == [1, 2, 3, 4]  # read: now the most recent
    cache.put("c", [9, 10, 11, 12])  # 12 > 10: the least recently read (b) goes
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    cache.put("d", [13, 14])  # 10 tokens: at the bound, kept
    assert cache.get("d") is not None and not cache.has_room()
    cache.put("c", [1])  # replacing counts the old ids out
    assert cache.has_room()


@torch.no_grad()
def test_the_skill_eval_scores_the_lookup_on_the_slots_next_tokens(smol_tokenizer):  # noqa: F811
    """`longllama eval`'s knn system: a span that repeats a memory chunk finds each of its positions as the
    chunk's slot and votes for the token after it there (weight 0.9: at least 0.9 of the probability), so the
    datastore's next ids are the chunk's ids shifted by one, as the engine's; weight 0 leaves the model's."""
    from finetune.skill_eval import EvalLookup

    model = tiny_model_for(smol_tokenizer, mem_layers=[1]).eval()  # layer 1's input: the same with memory or not
    ids = smol_tokenizer("def shout(text):\n    return text.upper()")["input_ids"]
    memory = model.encode_memory(torch.tensor([ids]))
    lookup, off = EvalLookup(model, 0.9), EvalLookup(model, 0.0)  # probes on the model before its forward
    logp = torch.log_softmax(model(torch.tensor([ids]), memory=memory).logits.float(), -1)  # (1, T, V)
    mixed = lookup.mix(logp, memory, [ids])
    following = torch.tensor(ids[1:])
    assert (mixed[0, :-1].gather(-1, following[:, None]) > torch.log(torch.tensor(0.9))).all()
    assert (logp[0, :-1].gather(-1, following[:, None]) < torch.log(torch.tensor(0.5))).all()  # not the model's
    assert torch.equal(off.mix(logp, memory, [ids]), logp)
    with pytest.raises(ValueError, match="slots"):
        lookup.mix(logp, memory, [ids[:-1]])
