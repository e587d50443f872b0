"""memory.retrieveTokens: a completion's memory holds only the chunks of other files that best match the
code before the cursor (BM25 over identifiers, longllama_lsp/lexical.py), the open file's own chunks always.

Test Data: a seeded tiny LongLLaMA + SmolLM2 tokenizer (tests/helpers_models.py) loaded by the engine's
worker; a repository of five small Python files written to tmp_path and indexed by the real
indexer.pipeline (SQLite store, tree-sitter chunks, MemoryBank): `limits.py` defines RETRY_LIMIT and
BACKOFF_SECONDS, three others define unrelated names, `upload.py` (the open file) uses RETRY_LIMIT.
What memory a request read is the assembled memory's mask (the slots it could attend to).
"""

from __future__ import annotations

from collections import Counter

import pytest
from helpers_memory import RETRY_FILES, RETRY_OPEN, indexed_engine, visible_chunks, write_repository
from helpers_models import smol_tokenizer_dir, tiny_model_dir  # noqa: F401

from longllama_lsp.lexical import (
    DEFINITIONS_SHARE,
    SCAN_CHARS,
    Candidate,
    ChunkRetriever,
    Query,
    defined_by,
    names_file,
    nested_in,
    query_terms,
    typed_prefix,
    wanted_definitions,
)
from longllama_lsp.settings import Settings
from longllama_lsp.shared import engine_options

FILES, OPEN = RETRY_FILES, RETRY_OPEN


@pytest.fixture
def repo_engine(tiny_model_dir, tmp_path):  # noqa: F811
    with indexed_engine(tiny_model_dir, write_repository(tmp_path, FILES, OPEN)) as (engine, repo):
        yield engine, repo, tmp_path


def visible_paths(engine, repo) -> set[str]:
    """Files with a chunk the last request's memory could attend to."""
    return {meta.path for meta in visible_chunks(engine, repo.bank)}


def limits_tokens(repo) -> int:
    return sum(len(repo.bank.chunk_slots(c)) for c in repo.bank.chunks_of("limits.py"))


def test_retrieval_keeps_the_defining_file_and_leaves_the_others_out(repo_engine):
    engine, repo, root = repo_engine
    engine.options.retrieve_tokens = limits_tokens(repo)  # room for the defining file only
    engine.complete(OPEN, len(OPEN), path=str(root / "upload.py"))
    assert visible_paths(engine, repo) == {"limits.py"}


def test_zero_keeps_every_file(repo_engine):
    engine, repo, root = repo_engine
    engine.options.retrieve_tokens = 0
    engine.complete(OPEN, len(OPEN), path=str(root / "upload.py"))
    assert visible_paths(engine, repo) == set(FILES)


def test_with_retrieval_off_a_completion_builds_no_query(repo_engine, monkeypatch):
    """The query reads the text before the cursor (16 ms at 4 MB): not on every keystroke for nothing."""
    engine, repo, root = repo_engine
    engine.options.retrieve_tokens = 0
    built = []
    monkeypatch.setattr(Query, "before_cursor", classmethod(lambda cls, text: built.append(text)))
    engine.complete(OPEN, len(OPEN), path=str(root / "upload.py"))
    assert built == []


def test_a_chunk_changed_on_disk_since_indexing_is_not_retrieved(repo_engine):
    """Its text no longer hashes as indexed: nothing of it is read back, so it matches nothing (had the
    warm-up read it before the change, its terms would be the indexed text's, as its memory is)."""
    engine, repo, root = repo_engine
    engine.on_worker(lambda: None)  # after the warm-up indexing queued
    engine._assembler._retriever = ChunkRetriever()  # as before any warm-up
    (root / "limits.py").write_text(FILES["limits.py"].replace("7", "9").replace("attempt", "tries"))  # each chunk
    assert [repo.chunk_text(meta) for meta in repo.bank.chunks_of("limits.py").values()] == [None, None]
    engine.options.retrieve_tokens = 10_000
    engine.complete(OPEN, len(OPEN), path=str(root / "upload.py"))
    assert "limits.py" not in visible_paths(engine, repo)


def test_the_setting_reaches_the_engine():
    s = Settings()
    assert engine_options(s).retrieve_tokens == s.memory.retrieve_tokens
    s.memory.retrieve_tokens = 1234
    assert engine_options(s).retrieve_tokens == 1234


def test_bm25_ranks_by_rare_shared_identifiers_within_the_budget():
    texts = {"a": "RETRY_LIMIT = 7\nx = 1", "b": "x = x + 1\ny = x", "c": "def send(x):\n    return x", "d": None}
    cands = [Candidate(k, k, 10, lambda t=t: t) for k, t in texts.items()]
    retriever = ChunkRetriever()
    query = Query(query_terms("import os\n" * 30 + "pass\n" * 18 + "for attempt in range(RETRY_LIMIT):\n    send(x)"))
    assert "os" not in query.terms  # only the last 20 lines
    assert retriever.top(cands, query, 10) == {"a"}  # the rare shared name wins; one chunk fits
    assert retriever.top(cands, query, 20) == {"a", "c"}
    assert retriever.top(cands, query, 1000) == {"a", "b", "c"}  # "d" is unreadable: never retrieved
    assert retriever.top(cands, Query(Counter()), 1000) == set()


def test_the_name_being_typed_finds_the_identifiers_it_starts():
    texts = {"greeter": "class Greeter:\n    pass", "other": "value = unrelated(1)"}
    cands = [Candidate(k, k, 10, lambda t=t: t) for k, t in texts.items()]
    before = "def main():\n    g = Gre"
    assert typed_prefix(before) == "Gre" and typed_prefix(before + " ") == "" and typed_prefix("x.a") == "a"
    retriever = ChunkRetriever()
    assert retriever.top(cands, Query(query_terms(before)), 100) == set()  # no whole name in common
    assert retriever.top(cands, Query.before_cursor(before), 100) == {"greeter"}


def test_the_code_before_the_cursor_wants_what_it_imports_and_uses_but_does_not_define():
    before = ("from .utils import (\n    get_auth_from_url,\n    to_native_string,\n)\n"
              "use crate::net::{Backoff, retry};\nuser_map = {'a': 1}\n" + "x = 1\n" * 30 +
              "def send(self, request):\n    proxy = select_proxy(request.url)\n    ")
    wanted = wanted_definitions(before, query_terms(before))
    assert {"get_auth_from_url", "to_native_string", "Backoff", "retry"} <= wanted  # imports above the window
    assert {"select_proxy", "request"} <= wanted  # names the last lines use
    assert "send" not in wanted and "utils" in wanted and "import" not in wanted and "crate" not in wanted
    assert "user_map" not in wanted  # a line starting `user...` is no `use` declaration
    assert defined_by("HTTPAdapter.send") == {"send"} and defined_by(None) == frozenset()


def test_a_huge_file_is_read_for_its_imports_at_both_ends_only():
    """A generated 1 MB file: the import lines and own definitions of its first and last SCAN_CHARS count (a
    completion read all of it: ~100 ms a keystroke at 1 MB, 0.4 s at 4 MB, mostly typed_prefix's search)."""
    filler = "x = 1\n" * (SCAN_CHARS // 3)
    before = "from top import first_name\n" + filler + "from middle import lost_name\n" + filler + \
        "from bottom import last_name\n" + "y = 2\n" * 25 + "z = Gre"
    wanted = wanted_definitions(before, query_terms(before))
    assert {"first_name", "last_name"} <= wanted and "lost_name" not in wanted
    assert typed_prefix(before) == "Gre"


def test_chunks_defining_wanted_names_come_first_within_their_share():
    """A definition that shares no identifier with the last lines is retrieved before chunks that use
    them, within DEFINITIONS_SHARE of the budget; the rest of the budget is ranked as before."""
    texts = {"use1": "proxy = select_proxy(url)\nurl = proxy", "use2": "select_proxy(url, proxies)",
             "def": "def get_auth_from_url(u):\n    return unquote(u)", "def2": "def get_auth_from_url(v): pass"}
    defines = {"def": frozenset({"get_auth_from_url"}), "def2": frozenset({"get_auth_from_url"})}
    cands = [Candidate(k, k, 10, lambda t=t: t, defines.get(k, frozenset())) for k, t in texts.items()]
    before = "from .utils import get_auth_from_url\n" + "y = 2\n" * 25 + "proxy = select_proxy(url)\n"
    query = Query.before_cursor(before)
    assert "get_auth_from_url" in query.definitions
    retriever = ChunkRetriever()
    bm25_alone = Query(query.terms, query.prefix)
    assert retriever.top(cands, bm25_alone, 20) == {"use1", "use2"}  # without wanted names: BM25 alone
    assert DEFINITIONS_SHARE == 0.5
    got = retriever.top(cands, query, 20)
    assert len(got & {"def", "def2"}) == 1 and len(got & {"use1", "use2"}) == 1  # half the budget each
    assert len(retriever.top(cands, query, 40)) == 4


def test_a_question_about_a_class_reads_its_methods_and_a_completion_does_not():
    """The chunker gives a class header (`class Router:`) and each method a chunk of its own; the methods
    name no `Router` and every class chunk holds the keyword `class`. A question about the class gets its
    methods (Candidate.within) before the chunks that merely use the name; a completion that uses `Router`
    wants the definition of what it types next, not every method (definition recall fell on bench/crossfile)."""
    texts = {"head": "class Router:", "init": "def __init__(self, routes):\n    self.routes = list(routes)",
             "mount": "def mount(self, path, endpoint):\n    self.routes.append(Mount(path, endpoint))",
             "other": "class Other:\n    pass",
             "uses": "router = Router(routes)\nrouter.mount('/static', files)"}
    symbols = {"head": "Router", "init": "Router.__init__", "mount": "Router.mount", "other": "Other"}
    cands = [Candidate(k, k, 10, lambda t=t: t, defined_by(symbols.get(k)), "routing.py", nested_in(symbols.get(k)))
             for k, t in texts.items()]
    question = Query.question("What does the Router class do?")
    assert set(question.terms) == {"Router"} and question.members  # `class` is a question word
    retriever = ChunkRetriever()
    assert retriever.top(cands, question, 60) == {"head", "init", "mount", "uses"}  # half of 60: the class
    before = "from routing import Router\n" + "y = 2\n" * 25 + "app = Router(handlers)\napp."
    completion = Query.before_cursor(before)
    assert "Router" in completion.definitions and not completion.members
    assert retriever.top(cands, completion, 60) == {"head", "uses"}
    assert nested_in("Router.mount") == {"Router"} and nested_in("Outer.Inner.f") == {"Outer", "Inner"}
    assert nested_in(None) == frozenset()


def test_a_completion_retrieves_the_definition_of_a_name_its_file_imports(repo_engine):
    """The import is far above the last 20 lines, which share no identifier with words.py: only its
    chunk's symbol (the index's `shout`) brings it (the assembler passes symbols to the retriever)."""
    engine, repo, root = repo_engine
    before = "from words import shout\n" + "pass\n" * 30 + "def upload(data):\n    for attempt in range(RETRY_LIMIT):\n        "
    (root / "upload.py").write_text(before + "send(data)\n")
    words = sum(len(repo.bank.chunk_slots(c)) for c in repo.bank.chunks_of("words.py"))
    engine.options.retrieve_tokens = 2 * words
    engine.complete(before, len(before), path=str(root / "upload.py"))
    assert "words.py" in visible_paths(engine, repo)


def test_a_question_is_queried_by_its_names_not_its_question_words():
    q = Query.question("What does retry_budget return, and where is RETRY_LIMIT set?")
    assert set(q.terms) == {"retry_budget", "RETRY_LIMIT"}  # what/does/return/and/where/is/set left out
    assert q.definitions == {"retry_budget", "RETRY_LIMIT"} and q.whole_if_none and not q.prefix
    assert set(Query.question("What does `set` do, and what is set?").terms) == {"set"}  # in backticks: a name


def test_ask_retrieves_the_chunks_its_question_names(repo_engine):
    """`longllama ask` reads the chunks the question's names are in (here the only one naming
    retry_budget), not all of memory; 0 keeps every file."""
    engine, repo, root = repo_engine
    engine.options.retrieve_tokens = limits_tokens(repo)
    engine.answer("What does retry_budget compute?", max_tokens=1)
    assert visible_paths(engine, repo) == {"limits.py"}
    engine.options.retrieve_tokens = 0
    engine.answer("What does retry_budget compute?", max_tokens=1)
    assert visible_paths(engine, repo) == set(FILES) | {"upload.py"}


def test_a_question_naming_a_file_reads_that_file(repo_engine):
    """`What does words.py do?`: no chunk holds the word `words`; the file's chunks come first by its name."""
    engine, repo, root = repo_engine
    engine.options.retrieve_tokens = 4096
    engine.answer("What does words.py do?", max_tokens=1)
    assert visible_paths(engine, repo) == {"words.py"}
    q = Query.question("Is requests/utils.py at 2.32.3, e.g. in ./web/use.ts?")
    assert q.files == {"requests/utils.py", "./web/use.ts"}  # no version, no abbreviation
    assert "py" not in q.terms and "utils" in q.terms
    assert set(Query.question("Tell me about Session.send").terms) == {"Session", "send"}
    # any suffix the indexer names a kind of file for is no term (one table: indexer.languages.named_suffixes)
    assert set(Query.question("What is in tools.pyw and lib/api.mts?").terms) == {"tools", "lib", "api"}
    assert names_file("web/use.ts", q.files) and names_file("src/requests/utils.py", q.files)
    assert not names_file("requests/myutils.py", q.files)


def test_an_answer_reuses_no_prompt_computed_under_another_questions_memory(repo_engine, monkeypatch):
    """Each question retrieves its own memory: the previous answer's cache, computed with the previous
    memory above the first memory layer, would make an answer depend on the question asked before."""
    engine, repo, root = repo_engine
    engine.options.retrieve_tokens = limits_tokens(repo)
    gens = []
    generate = engine._decoder.generate
    monkeypatch.setattr(engine._decoder, "generate", lambda *a, **k: gens.append(generate(*a, **k)) or gens[-1])
    engine.answer("What does retry_budget compute?", max_tokens=1)
    engine.answer("What does shout return?", max_tokens=1)  # words.py, not limits.py: no reuse
    engine.answer("What does shout return?", max_tokens=1)  # the same memory: the prompt is reused
    assert [g.reused_tokens > 0 for g in gens] == [False, False, True]


def test_a_question_naming_nothing_in_the_code_reads_all_of_memory(repo_engine):
    engine, repo, root = repo_engine
    engine.options.retrieve_tokens = limits_tokens(repo)
    engine.answer("Summarize the purpose of everything here, please.", max_tokens=1)
    assert visible_paths(engine, repo) == set(FILES) | {"upload.py"}


def test_indexing_warms_retrieval_so_the_first_completion_reads_no_chunk_text(repo_engine, monkeypatch):
    """Workspace.index queues Assembler.warm on the worker: the chunk texts are read there, in the
    background, not by the first completion (at 1M tokens that read took 1-2 s under the repository lock)."""
    engine, repo, root = repo_engine
    engine.on_worker(lambda: None)  # queued behind the warm-up job indexing queued
    reads = []
    read = repo.chunk_text
    monkeypatch.setattr(repo, "chunk_text", lambda meta: reads.append(meta.path) or read(meta))
    engine.options.retrieve_tokens = limits_tokens(repo)
    engine.complete(OPEN, len(OPEN), path=str(root / "upload.py"))
    assert reads == []
    assert visible_paths(engine, repo) == {"limits.py"}  # ranked on the terms the warm-up read


def test_warming_goes_in_jobs_of_a_few_chunks_and_skips_unreadable_ones(repo_engine, monkeypatch):
    engine, repo, root = repo_engine
    engine.options.retrieve_tokens = 0
    asm = engine._assembler
    assert engine.on_worker(lambda: asm.warm(restart=True)) is False  # retrieval off: nothing
    engine.options.retrieve_tokens = 4096
    asm._retriever = type(asm._retriever)()  # nothing read yet
    read = repo.chunk_text
    unreadable = {"words.py", "colors.py"}
    monkeypatch.setattr(repo, "chunk_text", lambda meta: None if meta.path in unreadable else read(meta))
    jobs = [engine.on_worker(lambda: asm.warm(limit=1)) for _ in range(20)]
    chunks = repo.bank.resident().values()
    # one chunk a job, each unreadable one tried once: the chain ends (it would go on forever otherwise)
    assert jobs.index(False) == len(chunks) - 1 and not any(jobs[len(chunks):])
    assert all(asm._retriever.known(m.content_hash) == (m.path not in unreadable) for m in chunks)
