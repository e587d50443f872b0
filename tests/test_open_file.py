"""The open file's memory comes from the index (issue 15 item 4): a buffer chunk with an indexed chunk's
content is that chunk's memory; only edited chunks are encoded, once; the cursor moving encodes nothing.

Test Data: a seeded tiny LongLLaMA + SmolLM2 tokenizer (tests/helpers_models.py) loaded by the engine's
worker; a twelve-function Python file written to tmp_path, indexed by the real indexer.pipeline
(SQLite store, tree-sitter chunks: one chunk per function, MemoryBank). Encoder calls are counted at
`model.encode_memory`, the one way to the model's memory encoding; with `on_requests`, by the worker request
that made them (a completion's own, or a background encode of deferred edits).
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch
from helpers_memory import indexed_engine, visible_chunks
from helpers_models import smol_tokenizer, smol_tokenizer_dir, tiny_model_dir  # noqa: F401

from longllama_lsp import prompt
from longllama_lsp.engine import EngineOptions
from longllama_lsp.settings import Settings
from longllama_lsp.shared import engine_options

FUNCTIONS = [f"def step_{i}(value):\n    total = value * {i} + {i * 7}\n    return total - {i}\n\n\n"
             for i in range(12)]
SOURCE = "".join(FUNCTIONS)


@pytest.fixture
def indexed(tiny_model_dir, tmp_path):  # noqa: F811
    (tmp_path / "steps.py").write_text(SOURCE)
    with indexed_engine(tiny_model_dir, tmp_path) as (engine, repo):
        model = engine.model
        calls: list[int] = []  # tokens per encoder call
        encode = model.encode_memory

        def counting(input_ids, *args, **kwargs):
            calls.append(input_ids.shape[-1])
            return encode(input_ids, *args, **kwargs)

        model.encode_memory = counting
        yield engine, repo, str(tmp_path / "steps.py"), calls
        del model.encode_memory


def at(text: str, function: int) -> int:
    """The cursor at the end of `function`'s `return` line."""
    return text.index(f"return total - {function}\n") + len(f"return total - {function}")


def visible_functions(engine, repo) -> set[int]:
    """Indexes into FUNCTIONS (by start line) of steps.py's chunks the last request attended to."""
    return {(meta.start_line - 1) // 5 for meta in visible_chunks(engine, repo.bank) if meta.path == "steps.py"}


def test_an_unchanged_open_file_costs_no_encoder_calls_and_the_cursor_moving_none_either(indexed):
    engine, repo, path, calls = indexed
    assert len(repo.bank.chunks_of("steps.py")) == 12  # one chunk per function
    engine.complete(SOURCE, at(SOURCE, 8), path=path)
    assert calls == []
    seen = visible_functions(engine, repo)
    # The rest of the file (the cursor's chunk too: its text after the cursor), not what the window holds.
    assert seen == set(range(12)) - {6, 7}
    engine.complete(SOURCE, at(SOURCE, 3), path=path)  # the cursor moves
    assert calls == []
    assert 9 in visible_functions(engine, repo)


def test_a_file_in_the_repository_is_not_cut_into_buffer_blocks(indexed, tmp_path_factory, monkeypatch):
    """The repository's bank stands for the buffer: the text after the cursor is not tokenized into blocks
    that would be thrown away; a file outside every repository still is."""
    engine, _, path, _ = indexed
    seen: list[str] = []  # texts the prompt tokenized
    real = prompt.tokenize
    monkeypatch.setattr(prompt, "tokenize", lambda tokenizer, text: seen.append(text) or real(tokenizer, text))
    offset = at(SOURCE, 3)
    engine.complete(SOURCE, offset, path=path)
    assert seen[0] == SOURCE[:offset] and SOURCE[offset:] not in seen
    seen.clear()
    engine.complete(SOURCE, offset, path=str(tmp_path_factory.mktemp("outside") / "steps.py"))
    assert SOURCE[offset:] in seen


def test_the_buffer_is_cut_before_the_repository_lock_is_taken(indexed):
    """Cutting the buffer parses all of it: the indexer, waiting on the lock, must not wait for that too."""
    engine, repo, path, _ = indexed
    free: list[bool] = []  # whether another thread could take the repository's lock while the buffer was cut
    chunk = repo.chunk

    def probing(rel, text):
        def try_lock():
            got = repo.lock.acquire(blocking=False)
            if got:
                repo.lock.release()
            free.append(got)
        probe = threading.Thread(target=try_lock)
        probe.start()
        probe.join()
        return chunk(rel, text)

    repo.chunk = probing
    try:
        engine.complete(SOURCE, at(SOURCE, 8), path=path)
    finally:
        del repo.chunk
    assert free == [True]


def test_an_edit_encodes_only_the_edited_chunk_once(indexed, smol_tokenizer):  # noqa: F811
    engine, repo, path, calls = indexed
    edited = SOURCE.replace("total = value * 1 + 7", "total = value * 100 + 7")
    engine.complete(edited, at(edited, 9), path=path)
    new_chunk = FUNCTIONS[1].replace("* 1 +", "* 100 +")
    # step_1 after its context (step_0, the text before it), one call; its chunk may keep blank lines
    expected = len(smol_tokenizer(FUNCTIONS[0] + new_chunk.rstrip("\n") + "\n", add_special_tokens=False)["input_ids"])
    assert len(calls) == 1 and abs(calls[0] - expected) <= 3
    assert 1 in visible_functions(engine, repo)  # the edited text, not the indexed one
    engine.complete(edited, at(edited, 5), path=path)  # the cursor moves: nothing new
    typed = edited[:at(edited, 5)] + " + 1" + edited[at(edited, 5):]
    engine.complete(typed, at(edited, 5) + 4, path=path)  # typing in a chunk: it is the local window's
    assert len(calls) == 1


# -- deferred edits: a completion in the language server never waits for encoding edited chunks ----------------


def deferring(engine, idle_ms: int = 0) -> None:
    engine.options = dataclasses.replace(engine.options, defer_edits=True, defer_idle_ms=idle_ms)


def on_requests(engine) -> list[tuple[int | None, str]]:
    """(the worker request's id, the text encoded) of each encoder call from now on."""
    model, seen = engine.model, []
    encode = model.encode_memory

    def recording(input_ids, *args, **kwargs):
        seen.append((engine._worker.running, engine.tokenizer.decode(input_ids[0].tolist())))
        return encode(input_ids, *args, **kwargs)

    model.encode_memory = recording  # the fixture's `del model.encode_memory` removes this one too
    return seen


def settle(engine) -> None:
    """Wait until the background encodes of deferred edits have run: a BACKGROUND job queued now runs after
    those queued before it, and once it finds nothing deferred, the job that encoded the last one is done."""
    for _ in range(200):  # the jobs are queued from a timer thread once completions pause (defer_idle_ms)
        if not engine.on_worker(lambda: bool(engine._assembler.deferred)):
            return
        time.sleep(0.05)
    raise AssertionError("deferred edits were never encoded")


def buffer_id(repo, text: str, marker: str) -> tuple:
    """The bank id an edited chunk of steps.py (the one containing `marker`) gets (Assembler._add_edited)."""
    chunk = next(c for c in repo.chunk("steps.py", text) if marker in c.text)
    return ("buffer", "steps.py", chunk.memory_key)


def test_an_edited_chunk_is_encoded_after_its_context_as_the_indexer_encodes_it(indexed):
    """The engine's encode of an edited buffer chunk (Engine._chunk_ids) builds the indexer's row: the same
    memory as indexer.encoder.Encoder for that text after that context, which differs from the text alone."""
    from indexer.encoder import Encoder

    engine, repo, path, calls = indexed
    edited = SOURCE.replace("total = value * 1 + 7", "total = value * 100 + 7")
    engine.complete(edited, at(edited, 9), path=path)
    chunk = next(c for c in repo.chunk("steps.py", edited) if "* 100 +" in c.text)
    assert FUNCTIONS[0].strip() in chunk.context
    ours = engine.on_worker(lambda: engine._assembler._blocks[chunk.memory_key])
    encoder = Encoder(engine.model, engine.tokenizer)
    theirs, alone = engine.on_worker(lambda: (encoder.encode([chunk.text], contexts=[chunk.context])[0],
                                              encoder.encode([chunk.text])[0]))
    for layer, cache in theirs.items():
        assert torch.equal(ours[layer].keys, cache.keys) and torch.equal(ours[layer].values, cache.values)
        assert not torch.equal(ours[layer].keys, alone[layer].keys)


def test_a_chunk_below_an_edit_keeps_its_indexed_memory(indexed):
    """Its text is unchanged, the text before it is not: its memory key differs from the indexed chunk's,
    yet it uses the indexed memory (encoded after the old context) rather than an encode per keystroke."""
    engine, repo, path, calls = indexed
    edited = SOURCE.replace("total = value * 1 + 7", "total = value * 100 + 7")
    below = next(c for c in repo.chunk("steps.py", edited) if "step_2(" in c.text)
    indexed_keys = {meta.memory_key for meta in repo.bank.chunks_of("steps.py").values()}
    assert below.memory_key not in indexed_keys  # its context holds the edit
    engine.complete(edited, at(edited, 9), path=path)
    assert len(calls) == 1  # step_1 only
    assert 2 in visible_functions(engine, repo)


def test_the_server_defers_edits_and_the_cli_does_not():
    assert engine_options(Settings()).defer_edits  # the language server: the next keystroke picks them up
    assert not EngineOptions().defer_edits  # `longllama complete`/`ask` in process: no next request


def test_a_deferred_edit_costs_its_completion_no_encoder_calls_and_the_next_one_has_it(indexed):
    engine, repo, path, calls = indexed
    deferring(engine)
    by = on_requests(engine)
    edited = SOURCE.replace("total = value * 1 + 7", "total = value * 100 + 7") \
        .replace("total = value * 3 + 21", "total = value * 3 + 2100")
    first = engine.complete(edited, at(edited, 9), path=path)
    assert first.request_id not in [r for r, _ in by]  # step_1 and step_3 (outside the window): left out
    assert not {1, 3} & visible_functions(engine, repo)  # neither the edited nor the stale indexed text
    settle(engine)
    assert len(calls) == 2 and len({r for r, _ in by}) == 2  # one background job per chunk
    assert "2100" in by[0][1] and "* 100 +" in by[1][1]  # the nearest the cursor first
    second = engine.complete(edited, at(edited, 8), path=path)
    assert len(calls) == 2 and second.request_id not in [r for r, _ in by]  # found in the cache
    assert buffer_id(repo, edited, "* 100 +") in repo.bank and buffer_id(repo, edited, "+ 2100") in repo.bank
    assert {1, 3} <= visible_functions(engine, repo)


def test_a_burst_of_edits_leaves_only_the_latest_state_to_encode(indexed):
    """Keystrokes whose completions ran one after another (the worker busy throughout): the intermediate
    states of the edited chunk are never encoded, only the one the buffer has now."""
    engine, repo, path, calls = indexed
    deferring(engine)
    gate = threading.Event()
    engine.submit(lambda _req: gate.wait(60))  # holds the worker while the keystrokes queue
    states = [SOURCE.replace("total = value * 1 + 7", f"total = value * 1{'0' * n} + 7") for n in range(1, 4)]
    typed = [engine.submit_complete(s, at(s, 9), path=path, key=("keystroke", n)) for n, s in enumerate(states)]
    gate.set()
    for request in typed:
        request.result(timeout=120)
    settle(engine)
    assert len(calls) == 1  # step_1 as the last keystroke left it
    engine.complete(states[-1], at(states[-1], 8), path=path)
    assert len(calls) == 1 and buffer_id(repo, states[-1], "* 1000 +") in repo.bank
    assert 1 in visible_functions(engine, repo)


def test_deferred_edits_wait_for_a_pause_in_completions(indexed):
    """An encode already running cannot be preempted, so none starts while completions keep coming
    (defer_idle_ms after the last one); once they pause, the edits are encoded as before."""
    engine, repo, path, calls = indexed
    deferring(engine, idle_ms=600)
    edited = SOURCE.replace("total = value * 1 + 7", "total = value * 100 + 7")
    engine.complete(edited, at(edited, 9), path=path)
    for _ in range(4):  # keystrokes every 0.2 s: never a 0.6 s pause
        time.sleep(0.2)
        engine.complete(edited, at(edited, 9), path=path)
        assert not calls and engine.on_worker(lambda: bool(engine._assembler.deferred))
    settle(engine)
    assert len(calls) == 1


def test_the_pause_counts_from_the_end_of_a_slow_completion(indexed):
    """A completion that outlasts the idle time (here: queued behind 0.5 s of work) must not be followed at
    once by a deferred encode, or the next keystroke, sent when its answer arrives, waits behind it."""
    engine, repo, path, calls = indexed
    deferring(engine, idle_ms=300)
    edited = SOURCE.replace("total = value * 1 + 7", "total = value * 100 + 7")
    engine.submit(lambda _req: time.sleep(0.5))
    engine.submit_complete(edited, at(edited, 9), path=path).result(timeout=120)
    time.sleep(0.15)
    assert not calls and engine.on_worker(lambda: bool(engine._assembler.deferred))
    settle(engine)
    assert len(calls) == 1


def test_a_buffer_cut_again_after_a_keystroke_counts_only_the_changed_pieces(indexed):
    """The open file is cut at every keystroke; the tokenizer counts only pieces it has not seen."""
    engine, repo, path, calls = indexed
    counted: list[str] = []
    count = repo.encoder.count_tokens

    def counting(text: str) -> int:
        counted.append(text)
        return count(text)

    repo.encoder.count_tokens = counting
    try:
        repo.__dict__.pop("_buffer_token_counts", None)  # a fresh cache over the counting tokenizer
        repo.chunk("steps.py", SOURCE)
        first = len(counted)
        counted.clear()
        repo.chunk("steps.py", SOURCE.replace("total = value * 1 + 7", "total = value * 12 + 7"))
        assert first > 1 and len(counted) < first and all("* 12 +" in t for t in counted)
    finally:
        del repo.encoder.count_tokens
