"""A chunk's memory is encoded after the text before it in its file (indexer.encoder: contexts, memory keys).

Test Data: hand-written snippets; copies of the stdlib `json` package indexed with a seeded tiny random
LongLLaMA that uses the real SmolLM2 tokenizer (tests/helpers_models.py), real SQLite and tree-sitter.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers_models import smol_tokenizer_dir, tiny_model_dir  # noqa: F401

from indexer.encoder import Encoder, contexts, memory_key
from indexer.pipeline import Indexer, checkpoint_fingerprint
from indexer.schema import CONTEXT_CHARS

STDLIB = Path(json.__file__).parent.parent


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_a_context_is_the_text_before_the_chunk_cut_at_a_line_start():
    texts = ["import os\n", "X = 1\n", "def f():\n    return X\n"]
    assert contexts(texts, 1000) == ["", "import os\n", "import os\nX = 1\n"]
    # 12 characters end inside `import os`: the context starts at the next line, never mid-line
    assert contexts(texts, 12) == ["", "import os\n", "X = 1\n"]
    assert contexts(texts, 6) == ["", "", "X = 1\n"]  # the cut falls just after a newline: the line is whole
    assert contexts(texts, 0) == ["", "", ""]


def test_the_memory_key_names_text_and_context():
    assert memory_key(sha("x"), "") == sha("x")  # no context: the content hash, as every index before
    keys = {memory_key(sha("x"), "a\n"), memory_key(sha("x"), "b\n"), memory_key(sha("y"), "a\n")}
    assert len(keys) == 3 and sha("x") not in keys
    assert memory_key(sha("x"), "a\n") == memory_key(sha("x"), "a\n")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, one_thread):  # noqa: F811
    from longllama_lsp.model.loading import load_model, load_tokenizer

    return load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir), tiny_model_dir


def test_a_chunk_encoded_after_its_context_keeps_its_own_slots_of_the_joint_encoding(tiny):
    model, tok, _ = tiny
    context, text = "RETRY_LIMIT = 3\nBACKOFF = 0.5\n", "def retry():\n    return RETRY_LIMIT\n"
    encoder = Encoder(model, tok)
    after, alone = encoder.encode([text], contexts=[context])[0], encoder.encode([text])[0]
    ctx_ids, ids = (tok.encode(t, add_special_tokens=False) for t in (context, text))
    with torch.inference_mode():
        joint = model.encode_memory(torch.tensor([ctx_ids + ids]))  # (1, Hkv, T, D) per memory layer
    assert after.num_tokens == alone.num_tokens == len(ids)
    for layer, cache in after.items():
        assert torch.equal(cache.keys, joint[layer].keys[:, :, len(ctx_ids):])
        assert torch.equal(cache.values, joint[layer].values[:, :, len(ctx_ids):])
        assert not torch.allclose(cache.keys, alone[layer].keys)  # the context reached the memory layer


def test_a_context_longer_than_the_window_keeps_its_last_tokens(tiny):
    model, tok, _ = tiny
    encoder = Encoder(model, tok)
    text = "x = 1\n"
    lead = encoder.context_ids("y = 2\n" * 200, len(encoder.token_ids(text)))  # far over the 128-token window
    assert len(lead) + len(encoder.token_ids(text)) == model.config.max_position_embeddings
    assert encoder.encode([text], contexts=["y = 2\n" * 200])[0].num_tokens == len(encoder.token_ids(text))


def test_the_context_is_part_of_the_index_fingerprint(tiny):
    _, _, model_dir = tiny
    alone, after = checkpoint_fingerprint(model_dir, 0), checkpoint_fingerprint(model_dir)
    assert after.context_chars == CONTEXT_CHARS and alone.digest != after.digest
    assert "context_chars" not in alone.to_json()  # indexes built before contexts keep their digest


def test_a_killed_pass_reads_the_contexts_back_and_encodes_what_a_clean_pass_does(tiny, tmp_path):
    """Memories lost after chunking (a kill between the chunk rows' commit and the encode) are encoded after
    contexts read back from the files: the same memory keys and bytes as the pass that was not killed."""
    model, tok, model_dir = tiny
    root = tmp_path / "repo"
    shutil.copytree(STDLIB / "json", root / "json", ignore=shutil.ignore_patterns("__pycache__", "tests"))
    with Indexer.open(root, model, tok, model_dir, chunk_tokens=96) as ix:
        ix.index()
        rows = [r for r in ix.store.chunks("json/decoder.py") if r.memory_key != r.content_hash]
        assert len(rows) >= 3  # chunks after the first have a context
        clean = {r.memory_key: ix.store.get_memory(r.memory_key) for r in rows}
        ix.store.db.execute("DELETE FROM memories WHERE memory_key IN (SELECT value FROM json_each(?))",
                            [json.dumps(list(clean))])
    with Indexer.open(root, model, tok, model_dir, chunk_tokens=96) as ix:  # a new process: no texts in hand
        summary = ix.index()
        assert summary.chunks_encoded == len(clean)
        for key, memory in clean.items():
            again = ix.store.get_memory(key)
            assert all(torch.equal(again[i].keys, memory[i].keys) for i in memory)


def test_a_file_changed_after_chunking_is_not_encoded_with_a_stale_context(tiny, tmp_path):
    model, tok, model_dir = tiny
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    source = "".join(f"def f{i}(x):\n    return x * {i} + {i * 7}\n\n\n" for i in range(40))
    (root / "pkg" / "a.py").write_text(source)
    with Indexer.open(root, model, tok, model_dir, chunk_tokens=48) as ix:
        ix.index()
        later = [r for r in ix.store.chunks("pkg/a.py") if r.memory_key != r.content_hash][-1]
        ix.store.db.execute("DELETE FROM memories WHERE memory_key = ?", [later.memory_key])
    # the text before the last chunk changes, the chunk itself does not
    (root / "pkg" / "a.py").write_text(source.replace("return x * 38 + 266", "return x * 38 + 267"))
    with Indexer.open(root, model, tok, model_dir, chunk_tokens=48) as ix:
        assert ix._context_of(later) is None  # the read-back context no longer gives the row's key
