"""Does memory retrieve? (`longllama eval --task ...`, issue 16). Three measurements:

crossfile-ids  On held-out repositories, spans of `span_len` tokens of a file F that contain
               cross-file identifier tokens (finetune.pycode: names F binds nowhere and another
               file of the repository exports). Each span is scored after `budget - span_len`
               tokens of prompt, under three systems at the same prompt budget:
                 none    the in-file prefix only
                 memory  the same prompt + repository memory: the other files' chunks
                         (`chunk_len` tokens, each encoded after the `memory_context` tokens before
                         it in its file, as the indexer does; 0: each on its own), the
                         files F imports first, then files defining the names F uses, then the
                         rest, up to `memory_tokens`
                 retrieved  the same prompt + the memory completions read (memory.retrieveTokens): the
                         other files' chunks that best match the 20 lines before the span (BM25 over
                         identifiers, longllama_lsp.lexical, as Assembler._retrieve ranks them), up
                         to `retrieve_tokens`; one memory per span
                 knn     retrieved + the kNN lookup over that memory (longllama_lsp/knn.py, weight
                         `knn_weight` = memory.knnWeight): what completions read; scored from the
                         retrieved system's own forward pass (no extra model time)
                 bm25    BM25 snippets of the other files (bench/crossfile/retrieval.py: 20-line
                         windows, query = the 20 lines before the span, at most half the prompt)
                         pasted as comments before the in-file prefix, cut to the same budget
               Reported: mean NLL and top-1 accuracy over the cross-file identifier tokens (and
               NLL over all span tokens).
passkey        finetune/passkey.py's prompt at several lengths, key at a uniform random depth.
               The last `local_len` tokens are the local context; everything before is memory in
               `chunk_len` chunks. Memory is an unordered bag of per-chunk keys/values at position
               0, so identical chunks (the filler repeats) are encoded once and reused across
               trials and lengths: 64k tokens cost a few distinct chunks. Greedy answer; a trial
               passes when the key is in it. Reported per length: accuracy, and accuracy over the
               trials whose key sat in memory (not in the local window). `--passkey-prompt ask|bare`
               asks the way users do: memory = the filler and key alone, local = `longllama ask`'s
               chat prompt or the bare question line (every trial's key is then in memory).
guard          finetune.evaluate's held-out perplexity without memory (the "no harm" check).
"""

from __future__ import annotations

import importlib.util
import math
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from finetune.config import DataArgs
from finetune.data import SourceFile, collect_files, document_ends
from finetune.evaluate import chunk_candidates
from finetune.pycode import analyse, crossfile_names, exports, module_name, resolve_imports, token_flags
from longllama_lsp.engine import EngineOptions
from longllama_lsp.lexical import Candidate, ChunkRetriever, Query

SYSTEMS = ("none", "memory", "retrieved", "knn", "bm25")
from finetune.skill_args import TASKS  # noqa: E402  (argparse side kept torch-free)


@dataclass
class SkillArgs:
    budget: int = 512  # prompt tokens before + including the scored span (all systems)
    span_len: int = 128  # scored tokens per span
    chunk_len: int = 256  # memory chunk (the indexer's chunk budget)
    memory_tokens: int = 8192  # repository memory per file (files it imports first)
    retrieve_tokens: int = 4096  # memory of the "retrieved" system (the server's memory.retrieveTokens)
    # Tokens of its file before a memory chunk that it is encoded after: the index's 1,024 characters are
    # ~256-300 tokens of code (indexer.encoder.CONTEXT_CHARS); 0: alone, as the index encoded before stop 34.
    memory_context: int = 256
    knn_weight: float = EngineOptions.knn_weight  # the "knn" system's mixture weight (memory.knnWeight)
    files_per_repo: int | None = 6  # files scored per repository (seeded sample of those with spans)
    spans_per_file: int = 2
    batch_size: int = 4
    passkey_lengths: tuple[int, ...] = (4096, 16384, 65536)
    passkey_trials: int = 8
    passkey_prompt: str = "reference"  # skill_args.PROMPT_STYLES: what precedes the answer in the local window
    local_len: int | None = None  # passkey local window; None = the model's last_context_length
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Repositories


@dataclass
class RepoFile:
    path: str
    text: str
    ids: list[int]  # [bos] + tokens + [eos] (finetune.data.document_ends)
    flags: list[bool]  # per id: a cross-file identifier token
    imports: list[str]
    names: set[str]  # its cross-file names

    @cached_property  # the benches slice it per span: once per file, not once per span
    def starts(self) -> list[bool]:
        """Per id: the first token of a cross-file identifier (of a run of flagged tokens): what a completion
        must choose unaided; the tokens after it continue a name already begun."""
        return [fl and not (i and self.flags[i - 1]) for i, fl in enumerate(self.flags)]


@dataclass
class Repo:
    name: str
    root: Path
    files: dict[str, RepoFile]
    exports: dict[str, set[str]]
    _candidates: dict[int, list[Candidate]] = field(default_factory=dict, repr=False, compare=False)

    def chunk_candidates(self, chunk_len: int, tokenizer: Any) -> list[Candidate]:
        """Every file's `chunk_len`-token chunks as retrieval candidates (finetune.evaluate.chunk_candidates),
        decoded once per repository: each span retrieves among the other files' (Candidate.path)."""
        if chunk_len not in self._candidates:
            files = {p: f.ids for p, f in self.files.items()}
            self._candidates[chunk_len] = chunk_candidates(self.name, files, chunk_len, tokenizer)
        return self._candidates[chunk_len]


def python_files(root: Path) -> list[SourceFile]:
    """Python files of a repository as training and the guard see them (finetune.data.collect_files:
    walker ignore rules, symlinks, secret, size and binary filters), minus packaging metadata and
    hidden paths. Identical files are all kept: each is a module that imports resolve to."""
    data = DataArgs(sources=[str(root)], languages=[".py"], min_doc_tokens=0, dedup=False)
    return [f for f in collect_files(data)
            if not any(part.endswith(".dist-info") or part.startswith(".") for part in PurePosixPath(f.path).parts)]


def load_repo(root: str | Path, tokenizer: Any) -> Repo:
    root = Path(root)
    texts = {}
    for f in python_files(root):
        try:
            texts[f.path] = f.read_text()
        except (OSError, UnicodeDecodeError):
            continue  # one unreadable file never stops the evaluation
    ex = {p: exports(t) for p, t in texts.items()}
    modules = {module_name(p): p for p in texts}
    files = {}
    bos, eos = document_ends(tokenizer)
    for p, text in texts.items():
        facts = analyse(text)
        others = set().union(*(e for q, e in ex.items() if q != p)) if len(ex) > 1 else set()
        names = crossfile_names(facts, others)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        flags = token_flags(text, enc["offset_mapping"], [(s, e) for s, e, n in facts.identifiers if n in names])
        files[p] = RepoFile(p, text, [bos, *enc["input_ids"], eos], [False, *flags, False],
                            resolve_imports(p, facts.imports, modules), names)
    return Repo(root.resolve().name, root, files, ex)


@dataclass
class Span:
    repo: str
    path: str
    start: int  # index into the file's ids of the first scored target
    end: int


def pick_spans(repo: Repo, args: SkillArgs) -> list[Span]:
    """Seeded, non-overlapping spans holding cross-file identifier tokens."""
    rng = random.Random(f"{args.seed}:{repo.name}")
    per_file: dict[str, list[Span]] = {}
    for p, f in sorted(repo.files.items()):
        hits = [i for i, fl in enumerate(f.flags) if fl and i >= 1]
        rng.shuffle(hits)
        spans: list[Span] = []
        for h in hits:
            start = max(1, h - rng.randrange(args.span_len))
            end = min(len(f.ids), start + args.span_len)
            if any(s.start < end and start < s.end for s in spans):
                continue
            spans.append(Span(repo.name, p, start, end))
            if len(spans) == args.spans_per_file:
                break
        if spans:
            per_file[p] = sorted(spans, key=lambda s: s.start)
    paths = sorted(per_file)
    if args.files_per_repo is not None and len(paths) > args.files_per_repo:
        paths = sorted(rng.sample(paths, args.files_per_repo))
    return [s for p in paths for s in per_file[p]]


def memory_files(repo: Repo, path: str, budget: int, seed: int) -> list[str]:
    """Other files for `path`'s memory: imported, then defining its names, then the rest; <= budget tokens."""
    f = repo.files[path]
    definers = [q for q in sorted(repo.files) if q != path and repo.exports.get(q, set()) & f.names]
    rest = [q for q in sorted(repo.files) if q != path]
    random.Random(f"{seed}:{path}").shuffle(rest)
    out, used = [], 0
    for q in [*f.imports, *definers, *rest]:
        if q in out or q == path:
            continue
        n = len(repo.files[q].ids)
        if used + n > budget:
            continue
        out.append(q)
        used += n
    return out


def retrieved_chunks(repo: Repo, span: Span, args: SkillArgs, tokenizer: Any, retriever: ChunkRetriever
                     ) -> list[tuple]:
    """Keys (repo, path, start) of the other files' `chunk_len`-token chunks that completions would retrieve
    for the code before `span` (longllama_lsp.lexical: chunks defining names that code uses or imports first,
    then BM25 by the last 20 lines and the typed name's prefix),
    within `retrieve_tokens`; in file order. `retriever` (a ChunkRetriever per repository) keeps the terms."""
    before = tokenizer.decode(repo.files[span.path].ids[1:span.start])
    others = [c for c in repo.chunk_candidates(args.chunk_len, tokenizer) if c.path != span.path]
    chosen = retriever.top(others, Query.before_cursor(before), args.retrieve_tokens)
    return sorted(chosen)


def chunk_ids(repo: Repo, key: tuple, chunk_len: int) -> list[int]:
    _, path, start = key
    return repo.files[path].ids[start:start + chunk_len]


def chunks_memory(cache, repo: Repo, keys: Sequence[tuple], chunk_len: int):
    """The memory of chunks `keys` (from retrieved_chunks), each encoded after the tokens before it in its
    file as far as the cache's context reaches (finetune.evaluate.MemoryCache); None for no keys."""
    cache.ensure({k: chunk_ids(repo, k, chunk_len) for k in keys}, {k: repo.files[k[1]].ids[:k[2]] for k in keys})
    return cache.memory(keys)


# ---------------------------------------------------------------------------------------------
# BM25 prompts (the benchmark's system (b))


def _retrieval_module():
    path = Path(__file__).resolve().parents[1] / "bench" / "crossfile" / "retrieval.py"
    if not path.is_file():
        raise RuntimeError(f"the bm25 system needs bench/crossfile/retrieval.py (a source checkout); not at {path}")
    name = "longllama_bench_crossfile_retrieval"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


def bm25_prompt(repo: Repo, span: Span, budget_tokens: int, tokenizer: Any, index: Any, retrieval: Any) -> list[int]:
    """Ids of [snippets as comments] + in-file prefix, <= budget_tokens, ending right before the span."""
    f = repo.files[span.path]
    cut = f.ids[1:span.start]  # tokens before the span (bos dropped)
    prefix = tokenizer.decode(cut)
    query = "\n".join(prefix.split("\n")[-retrieval.WINDOW:])

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    header, _ = retrieval.build_header(count, index.top(query, span.path), budget_tokens // 2)
    # Whole prefix lines that fit beside the header; the ids keep the file's own tokenization.
    keep = count(retrieval.fit_prefix(count, header, prefix, budget_tokens)) if header else budget_tokens
    tail = cut[-keep:] if keep else []
    head = tokenizer(header, add_special_tokens=False)["input_ids"] if header else []
    ids = [f.ids[0], *head, *tail]
    return ids[-budget_tokens:] if len(ids) > budget_tokens else ids


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass
class SystemScore:
    xid_nll: float = 0.0
    xid_hits: int = 0
    xid_tokens: int = 0
    first_nll: float = 0.0  # the same over the first token of each cross-file identifier
    first_hits: int = 0
    first_tokens: int = 0
    all_nll: float = 0.0
    all_tokens: int = 0

    def summary(self) -> dict[str, float | int | None]:
        return {"xid_nll": self.xid_nll / self.xid_tokens if self.xid_tokens else None,
                "xid_top1": self.xid_hits / self.xid_tokens if self.xid_tokens else None,
                "xid_tokens": self.xid_tokens,
                "xid_first_nll": self.first_nll / self.first_tokens if self.first_tokens else None,
                "xid_first_top1": self.first_hits / self.first_tokens if self.first_tokens else None,
                "xid_first_tokens": self.first_tokens,
                "span_nll": self.all_nll / self.all_tokens if self.all_tokens else None,
                "span_tokens": self.all_tokens}


@torch.no_grad()
def _score(model, prompts: list[list[int]], targets: list[list[int]], flags: list[list[bool]],
           starts: list[list[bool]], memory, *scores: SystemScore) -> torch.Tensor:
    """prompts[i] + targets[i] in one right-padded batch; scores the targets (flagged ones as xid, `starts`
    as a name's first token) into each of `scores` (a total and a repository's: one forward pass for both).
    Returns the log-probabilities (B, T, V)."""
    from finetune.evaluate import _pad

    rows = [p + t for p, t in zip(prompts, targets, strict=True)]
    ids, mask = _pad(rows, model.device)
    out = model(ids, attention_mask=mask, memory=memory, use_cache=True, last_context_length=ids.shape[1])
    logp = torch.log_softmax(out.logits.float(), -1)  # (B, T, V)
    _tally(logp, prompts, targets, flags, starts, *scores)
    return logp


def _tally(logp: torch.Tensor, prompts: list[list[int]], targets: list[list[int]], flags: list[list[bool]],
           starts: list[list[bool]], *scores: SystemScore) -> None:
    """Adds the targets' NLL and top-1 under `logp` (B, T, V) to each of `scores`."""
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        pos = torch.arange(len(p) - 1, len(p) - 1 + len(t), device=logp.device)
        tgt = torch.tensor(t, device=logp.device)
        lp = logp[i, pos].gather(-1, tgt[:, None])[:, 0]
        top = logp[i, pos].argmax(-1) == tgt
        fl = torch.tensor(flags[i], device=logp.device)
        first = torch.tensor(starts[i], device=logp.device)
        for score in scores:
            score.all_nll += float(-lp.sum())
            score.all_tokens += len(t)
            score.xid_nll += float(-lp[fl].sum())
            score.xid_hits += int(top[fl].sum())
            score.xid_tokens += int(fl.sum())
            score.first_nll += float(-lp[first].sum())
            score.first_hits += int(top[first].sum())
            score.first_tokens += int(first.sum())


def eval_crossfile(model, tokenizer, repos: Sequence[Repo], args: SkillArgs, systems: Sequence[str] = SYSTEMS,
                   progress: bool = True) -> dict[str, Any]:
    from finetune.evaluate import MemoryCache

    model.eval()
    if args.span_len >= args.budget:
        raise ValueError(f"span_len {args.span_len} must be below the prompt budget {args.budget}")
    ctx = args.budget - args.span_len
    retrieval = _retrieval_module() if "bm25" in systems else None
    cache = MemoryCache(model, args.chunk_len, args.batch_size, progress=False, context=args.memory_context)
    scores = {s: SystemScore() for s in systems}
    per_repo: dict[str, dict[str, SystemScore]] = {}
    n_spans, mem_sizes, retrieved_sizes = 0, [], []
    if "knn" in systems and "retrieved" not in systems:
        raise ValueError("the knn system is scored from the retrieved system's forward pass: list both")
    lookup = EvalLookup(model, args.knn_weight) if "knn" in systems else None
    t0 = time.perf_counter()
    for repo in repos:
        spans = pick_spans(repo, args)
        retriever = ChunkRetriever()
        index = retrieval.SnippetIndex(repo.root, sorted(repo.files)) if retrieval else None
        rs = per_repo.setdefault(repo.name, {s: SystemScore() for s in systems})
        by_file: dict[str, list[Span]] = {}
        for s in spans:
            by_file.setdefault(s.path, []).append(s)
        for path, group in by_file.items():
            f = repo.files[path]
            targets = [f.ids[s.start:s.end] for s in group]
            tflags = [f.flags[s.start:s.end] for s in group]
            tstarts = [f.starts[s.start:s.end] for s in group]
            plain = [f.ids[max(0, s.start - ctx):s.start] for s in group]
            for system in systems:
                if system == "knn":
                    continue  # scored with "retrieved", from its forward pass
                if system == "retrieved":  # one memory per span: each retrieves for its own code
                    for s, target, fl, st, prompt in zip(group, targets, tflags, tstarts, plain, strict=True):
                        keys = retrieved_chunks(repo, s, args, tokenizer, retriever)
                        memory = chunks_memory(cache, repo, keys, args.chunk_len)
                        retrieved_sizes.append(memory.num_tokens if memory is not None else 0)
                        logp = _score(model, [prompt], [target], [fl], [st], memory, scores[system], rs[system])
                        if lookup is not None:
                            mixed = lookup.mix(logp, memory, [chunk_ids(repo, k, args.chunk_len) for k in keys])
                            _tally(mixed, [prompt], [target], [fl], [st], scores["knn"], rs["knn"])
                    continue
                memory = None
                if system == "memory":
                    files = memory_files(repo, path, args.memory_tokens, args.seed)
                    cache.ensure({(repo.name, q): repo.files[q].ids for q in files})
                    memory = cache.memory([(repo.name, q) for q in files])
                    mem_sizes.append(memory.num_tokens if memory is not None else 0)
                prompts = ([bm25_prompt(repo, s, ctx, tokenizer, index, retrieval) for s in group]
                           if system == "bm25" else plain)
                for b in range(0, len(group), args.batch_size):
                    sl = slice(b, b + args.batch_size)
                    _score(model, prompts[sl], targets[sl], tflags[sl], tstarts[sl], memory, scores[system],
                           rs[system])
            n_spans += len(group)
            if progress:
                print(f"crossfile-ids {repo.name}/{path}: {len(group)} spans "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    out = {"systems": {s: sc.summary() for s, sc in scores.items()},
           "per_repo": {r: {s: sc.summary() for s, sc in d.items()} for r, d in per_repo.items()},
           "spans": n_spans, "memory_tokens_mean": sum(mem_sizes) / len(mem_sizes) if mem_sizes else 0,
           "retrieved_tokens_mean": sum(retrieved_sizes) / len(retrieved_sizes) if retrieved_sizes else 0,
           "encoded_tokens": cache.encoded_tokens, "seconds": round(time.perf_counter() - t0, 1),
           "args": {k: v for k, v in asdict(args).items() if not k.startswith("passkey")}}
    base, mem = out["systems"].get("none", {}).get("xid_nll"), out["systems"].get("memory", {}).get("xid_nll")
    if base and mem:
        out["memory_vs_none"] = mem / base - 1
    for system in ("retrieved", "knn"):
        got = out["systems"].get(system, {}).get("xid_nll")
        if base and got:
            out[f"{system}_vs_none"] = got / base - 1
    return out


class EvalLookup:
    """The engine's kNN lookup (longllama_lsp/knn.py) on scored spans: the datastore is the span's retrieved
    memory at the last memory layer, each slot with the token after it in its chunk; the queries are every
    position's state in the same forward pass (a QueryProbe on the model)."""

    def __init__(self, model, weight: float):
        from longllama_lsp.knn import QueryProbe

        self.weight = weight
        self.layer = max(model.config.mem_layers) if model.config.mem_layers else None
        self.probe = QueryProbe(model, self.layer) if self.layer is not None else None

    def mix(self, logp: torch.Tensor, memory, chunks: list[list[int]]) -> torch.Tensor:
        """logp (1, T, V) of the latest forward with `memory`, whose slots hold `chunks`' ids in order ->
        log((1 - w) p + w p_knn) (1, T, V); `logp` itself without memory or memory layers."""
        from longllama_lsp.knn import TEMPERATURE, Datastore, following, mixture

        if memory is None or self.probe is None or self.weight <= 0:
            return logp
        next_ids = torch.cat([following(ids) for ids in chunks])  # (M,)
        if len(next_ids) != memory.num_tokens:
            raise ValueError(f"memory holds {memory.num_tokens} slots, its chunks {len(next_ids)} tokens")
        store = Datastore.of(memory, next_ids, self.layer)
        if store is None:
            return logp
        dist, ids = store.nearest(self.probe.states())  # (T, K)
        return mixture(logp[0], dist.to(logp.device), ids.to(logp.device), self.weight, TEMPERATURE)[None]


# ---------------------------------------------------------------------------------------------
# Passkey with a memory bag


@dataclass
class PasskeyScore:
    tokens: int
    trials: int = 0
    correct: int = 0
    in_memory: int = 0  # trials whose key sentence lay in memory
    correct_in_memory: int = 0
    depths: list[float] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    digits_in_memory: list[float] = field(default_factory=list)  # key_digits() of each key-in-memory trial

    def summary(self) -> dict[str, Any]:
        digits = self.digits_in_memory
        return {**asdict(self), "accuracy": self.correct / self.trials if self.trials else None,
                "accuracy_in_memory": self.correct_in_memory / self.in_memory if self.in_memory else None,
                "key_digits_in_memory": sum(digits) / len(digits) if digits else None}


def key_digits(key: str, answer: str) -> float:
    """The share of the key's digits the answer's first number has at the same place: a finer signal
    than exact match while retrieval is being learned ('47177' for 47178 is 0.8; no number is 0)."""
    got = re.search(r"\d+", answer)
    if got is None:
        return 0.0
    return sum(a == b for a, b in zip(key, got.group(), strict=False)) / len(key)


@dataclass
class PasskeyTrial:
    """One passkey prompt as the eval runs it: the local window (1, L) after the memory of the rest."""

    key: str
    ids: list[int]  # the whole prompt's tokens
    window: torch.Tensor  # (1, L) token ids, ending with the question
    memory: Any  # the prompt before the window, chunk by chunk (chunks concatenated: slot i = token i)
    key_at: int  # the key sentence's first token; a memory slot when key_at < split
    key_end: int  # one past the key sentence's last token
    split: int  # tokens in memory

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)


def passkey_trials(model, tokenizer, cache, n: int, args: SkillArgs, local: int, style: str = "reference"):
    """The eval's `args.passkey_trials` trials at about n tokens (seeded: the same prompts every run).

    style reference: the reference prompt, its last `local` tokens local, the rest memory.
          ask:       memory = the filler and key sentence alone (a folder of text files, as a user indexes
                     it); local = `longllama ask "What is the pass key?"`'s chat prompt (engine.ask_prompt_ids).
          bare:      the same memory; local = the question line alone, as typed at the top of a new file.
    """
    from finetune.passkey import filler_chars_for, passkey_prompt

    rng = random.Random(f"passkey-{n}-{args.seed}")
    n_chars = filler_chars_for(tokenizer, n)
    for _ in range(args.passkey_trials):
        prompt, key = passkey_prompt(n_chars, rng)
        if style != "reference":  # the text a user indexed: no task sentence, no question
            prompt = prompt[prompt.index("\n") + 1:prompt.rindex("\n")]
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        at = prompt.index(f"The pass key is {key}.")
        tail = " is the pass key."  # the key sentence's end ("... Remember it. {key} is the pass key.")
        key_at = len(tokenizer(prompt[:at], add_special_tokens=False)["input_ids"])
        key_end = len(tokenizer(prompt[:prompt.index(tail, at) + len(tail)], add_special_tokens=False)["input_ids"])
        split = max(0, len(ids) - local) if style == "reference" else len(ids)
        # (the context's tokens, the chunk's tokens): equal pairs share one memory, as the index shares them
        chunks = [(tuple(ids[max(0, i - args.memory_context):i] if args.memory_context else ()),
                   tuple(ids[i:min(i + args.chunk_len, split)])) for i in range(0, split, args.chunk_len)]
        cache.ensure({c: list(c[1]) for c in chunks}, {c: list(c[0]) for c in chunks})
        local_ids = ids[split:] if style == "reference" else _question_ids(tokenizer, style)
        window = torch.tensor([local_ids], device=model.device)
        yield PasskeyTrial(key, ids, window, cache.memory(chunks), key_at, key_end, split)


def _question_ids(tokenizer, style: str) -> list[int]:
    """The local window of a user-style trial: ask's chat prompt, or the question line alone."""
    from finetune.passkey import ASK_QUESTION, QUESTION

    if style == "ask":
        from longllama_lsp.engine import ask_prompt_ids

        return ask_prompt_ids(tokenizer, ASK_QUESTION)
    return tokenizer(QUESTION, add_special_tokens=True)["input_ids"]


def answer_passkey(model, tokenizer, trial: PasskeyTrial, max_new_tokens: int = 8) -> str:
    """Greedy answer; 8 tokens hold " 48213." after "The pass key is", an ask answer needs a sentence."""
    gen = model.generate(trial.window, max_new_tokens=max_new_tokens, memory=trial.memory,
                         last_context_length=trial.window.shape[1])
    return tokenizer.decode(gen[0, trial.window.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def eval_passkey(model, tokenizer, args: SkillArgs, progress: bool = True) -> dict[str, Any]:
    from finetune.evaluate import MemoryCache

    model.eval()
    local = args.local_len or model.config.last_context_length
    # Keyed by the chunk's tokens and its context's (the index encodes each chunk after the text before it):
    # a repeated pair is encoded once (encoded_tokens counts distinct ones).
    cache = MemoryCache(model, args.chunk_len, args.batch_size, progress=False, context=args.memory_context)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    for n in args.passkey_lengths:
        sc = PasskeyScore(n)
        for i, trial in enumerate(passkey_trials(model, tokenizer, cache, n, args, local, args.passkey_prompt)):
            answer = answer_passkey(model, tokenizer, trial, 24 if args.passkey_prompt == "ask" else 8)
            ok = trial.key in answer
            in_mem = trial.key_at < trial.split
            sc.trials += 1
            sc.correct += ok
            sc.in_memory += in_mem
            sc.correct_in_memory += ok and in_mem
            if in_mem:
                sc.digits_in_memory.append(key_digits(trial.key, answer))
            sc.depths.append(round(trial.key_at / trial.prompt_tokens, 3))
            sc.answers.append(answer.strip())
            if progress:
                print(f"passkey {n}: trial {i + 1} key {trial.key} depth {trial.key_at / trial.prompt_tokens:.2f} "
                      f"{'memory' if in_mem else 'local'} -> {answer.strip()!r} "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        out[str(n)] = sc.summary()
    out["encoded_tokens"] = cache.encoded_tokens
    out["local_len"] = local if args.passkey_prompt == "reference" else None
    out["prompt"] = args.passkey_prompt
    out["chunk_len"] = args.chunk_len
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def eval_guard(model, tokenizer, repo_roots: Sequence[str | Path], heldout_fraction: float = 0.3,
               max_windows: int | None = 8, batch_size: int = 4, progress: bool = False) -> dict[str, Any]:
    """Held-out perplexity without memory (finetune.evaluate, the issue-6 protocol: .py files)."""
    from finetune.evaluate import EvalArgs, evaluate, load_repo

    ea = EvalArgs(window=min(512, model.window), conditions=("none",), heldout_fraction=heldout_fraction,
                  max_windows=max_windows,
                  batch_size=batch_size, languages=[".py"])
    repos = [load_repo(r, tokenizer, ea) for r in repo_roots]
    report = evaluate(model, repos, ea, progress=progress)
    return {"perplexity": report.ppl("none"), "tokens": sum(f.tokens for f in report.files),
            "files": [f"{f.repo}/{f.path}" for f in report.files]}


def fmt(x: float | None, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def nothing_to_score(repo: Repo) -> str | None:
    """Why a repository gives the cross-file identifier eval no span (None: it has some): a table of
    dashes alone does not say whether the repository or the eval is at fault."""
    if not repo.files:
        return "no Python files: the cross-file identifier eval reads Python only"
    if len(repo.files) == 1:
        return "one Python file only: no other file's names to score"
    if not any(any(f.flags) for f in repo.files.values()):
        return (f"none of its {len(repo.files)} Python files uses a name that another of them defines: "
                "no cross-file identifier to score")
    return None


def _attention_label(select_tokens: int | str) -> str:
    return "dense" if select_tokens == "dense" else f"top blocks within {select_tokens} tokens"


def table(result: dict[str, Any]) -> str:
    lines = []
    cf = result.get("crossfile-ids")
    if cf:
        lines.append(f"cross-file identifier tokens ({cf['spans']} spans, {cf['systems'][next(iter(cf['systems']))]['xid_tokens']} "
                     f"tokens; memory {cf['memory_tokens_mean']:.0f} tokens on average, retrieved "
                     f"{cf.get('retrieved_tokens_mean', 0):.0f})")
        lines.append(f"{'system':9} {'xid NLL':>8} {'xid top-1':>10} {'first NLL':>10} {'first top-1':>12} "
                     f"{'span NLL':>9}")
        for s, v in cf["systems"].items():
            lines.append(f"{s:9} {fmt(v['xid_nll']):>8} {fmt(v['xid_top1'], True):>10} "
                         f"{fmt(v.get('xid_first_nll')):>10} {fmt(v.get('xid_first_top1'), True):>12} "
                         f"{fmt(v['span_nll']):>9}")
        lines.append("(first: the first token of each cross-file name, which a completion must pick unaided)")
    pk = result.get("passkey")
    if pk:
        local = f"local {pk['local_len']} tokens" if pk.get("local_len") else f"{pk.get('prompt')} prompt"
        lines.append(f"passkey ({local}, memory chunks of {pk['chunk_len']}, "
                     f"memory attention: {_attention_label(result.get('select_tokens', 'dense'))})")
        for n, v in pk.items():
            if isinstance(v, dict):
                digits = v.get("key_digits_in_memory")
                lines.append(f"  {int(n):>6} tokens: {v['correct']}/{v['trials']} "
                             f"(key in memory: {v['correct_in_memory']}/{v['in_memory']}"
                             + (f", key digits right: {digits:.0%}" if digits is not None else "") + ")")
    g = result.get("guard")
    if g:
        lines.append(f"held-out perplexity without memory: {g['perplexity']:.4f} ({g['tokens']} tokens)")
    return "\n".join(lines)


def run(args) -> int:
    """`longllama eval --task crossfile-ids|passkey|guard|skill`."""
    import json

    from finetune.commands import _device, load_eval_model

    tasks = TASKS if args.task == "skill" else (args.task,)
    if not args.repo and ("crossfile-ids" in tasks or "guard" in tasks):
        print("longllama eval: --task crossfile-ids/guard/skill needs --repo (held-out repositories, e.g. "
              "requests, flask, click)", file=sys.stderr)
        return 2
    model, tokenizer, model_dir = load_eval_model(args.model, _device(args.device), args.dtype)
    if args.select_tokens > 0:  # block-sparse memory attention, as the engine sets it
        model.config.select_memory_tokens(args.select_tokens)
    sa = SkillArgs(budget=args.budget, span_len=args.span_len, chunk_len=args.chunk_len,
                   memory_tokens=args.memory_tokens, retrieve_tokens=args.retrieve_tokens,
                   memory_context=args.memory_context, knn_weight=args.knn_weight,
                   files_per_repo=args.files_per_repo,
                   spans_per_file=args.spans_per_file, batch_size=args.batch_size,
                   passkey_lengths=tuple(int(x) for x in args.passkey_lengths.split(",")),
                   passkey_trials=args.passkey_trials, passkey_prompt=args.passkey_prompt,
                   local_len=args.local_len, seed=args.seed)
    result: dict[str, Any] = {"model": str(model_dir), "select_tokens": model.config.mem_budget or "dense"}
    for task in tasks:
        t0 = time.perf_counter()
        if task == "crossfile-ids":
            repos = [load_repo(r, tokenizer) for r in args.repo]
            for repo in repos:
                if why := nothing_to_score(repo):
                    print(f"longllama eval: {repo.root}: {why}", file=sys.stderr)
            result[task] = eval_crossfile(model, tokenizer, repos, sa, progress=args.progress)
        elif task == "passkey":
            result[task] = eval_passkey(model, tokenizer, sa, progress=args.progress)
        else:
            result[task] = eval_guard(model, tokenizer, args.repo, max_windows=args.guard_windows,
                                      batch_size=args.batch_size, progress=args.progress)
        result[task]["seconds"] = round(time.perf_counter() - t0, 1)
        if args.json_out and args.json_out != "-":
            Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")  # partial results survive
    if args.json_out == "-":
        print(json.dumps(result, indent=2))
    else:
        print(table(result))
    return 0
