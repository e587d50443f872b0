"""Perplexity of held-out files with and without repository memory (`longllama eval`).

Every held-out file is scored in windows of `window` tokens whose local context is the window
itself (the protocol of /work/shared/reference/measurements.md), under these memories:

    none      no memory
    own       the file's own earlier windows
    repo      the other files of its repository
    distract  repo + `distractor_ratio` x as many tokens of unrelated repositories
    retrieved what completions read: the other files' chunks that the server's retrieval
              (longllama_lsp.lexical) picks for the code before the window, up to `retrieve_tokens`,
              each `chunk_len` tokens encoded after the `memory_context` tokens before it, as the
              index encodes chunks; one memory per window (the first window of a file has no code
              before it: no memory)

Memory is what `model.encode_memory` leaves for chunks of <= window tokens, each chunk encoded
independently (no earlier memory), in padded batches. A file's chunks are exactly its evaluation
windows, so one encoding per file and model serves every condition (MemoryCache).

A file is [bos] + tokens + [eos] (finetune.data.encode_document, as in training); in each window
the first token is context only, the others are scored (next-token NLL, padding ignored).
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from finetune.config import DataArgs
from finetune.data import collect_files, encode_document, split_repo_files
from longllama_lsp.lexical import Candidate, ChunkRetriever, Query, defined_in

logger = logging.getLogger(__name__)

CONDITIONS = ("none", "own", "repo", "distract", "retrieved")


@dataclass
class EvalArgs:
    window: int = 512  # tokens per evaluation window and per memory chunk (measurements.md: 512)
    conditions: tuple[str, ...] = ("none", "own", "repo", "distract")  # "retrieved" needs the tokenizer
    distractor_ratio: float = 2.0  # distractor tokens per repository-memory token
    batch_size: int = 4  # windows (or memory chunks) per forward; logits are (B, window, vocab)
    heldout_fraction: float = 0.1  # split_repo_files, when held-out files are not given
    seed: int = 0  # held-out split and distractor order
    max_files: int | None = None  # held-out files per repository (first in path order)
    max_windows: int | None = None  # windows scored per file (the first ones)
    languages: list[str] | None = None  # file suffixes; None = every text file the walker keeps
    max_file_bytes: int = 1_000_000
    retrieve_tokens: int = 4096  # "retrieved": memory per window (the server's memory.retrieveTokens)
    chunk_len: int = 256  # "retrieved": tokens per chunk (the skill eval's, the indexer's chunk budget)
    memory_context: int = 256  # "retrieved": tokens before a chunk that it is encoded after (0: alone)

    def __post_init__(self):
        self.conditions = tuple(self.conditions)
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise ValueError(f"unknown conditions {bad}; expected some of {CONDITIONS}")
        if self.window < 2:
            raise ValueError(f"window must be >= 2 tokens, got {self.window}")
        if self.chunk_len < 1 or self.retrieve_tokens < 0 or self.memory_context < 0:
            raise ValueError("chunk_len >= 1, retrieve_tokens >= 0 and memory_context >= 0 required")


@dataclass
class EvalRepo:
    """One repository's files as token lists, and which of them are scored."""

    name: str
    root: Path
    files: dict[str, list[int]]  # relative path -> [bos] + tokens + [eos]
    heldout: list[str]

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self.files.values())


def load_repo(root: str | Path, tokenizer: Any, args: EvalArgs, heldout: Sequence[str] | None = None) -> EvalRepo:
    """Tokenize a repository's files (walker rules, size/language/secret filters, dedup)."""
    root = Path(root)
    data = DataArgs(sources=[str(root)], languages=args.languages, max_file_bytes=args.max_file_bytes,
                    min_doc_tokens=0)
    files = {f.path: encode_document(tokenizer, f.read_text())[0] for f in collect_files(data)}
    if heldout is None:
        heldout = split_repo_files(root, args.heldout_fraction, args.seed)[1] if args.heldout_fraction > 0 else []
    held = [p for p in sorted(heldout) if p in files]
    if args.max_files is not None:
        held = held[: args.max_files]
    return EvalRepo(root.resolve().name, root, files, held)


# ---------------------------------------------------------------------------------------------
# Memory


def _slice(mem, start: int, end: int):
    from longllama_lsp.model import MemCache, Memory

    return Memory({i: MemCache(c.keys[:, :, start:end], c.values[:, :, start:end], c.mask[:, :, start:end])
                   for i, c in mem.items()})


class MemoryCache:
    """Per-file memory for one model: chunks of <= window tokens, encoded in batches, each alone or (with
    `context` > 0) after the `context` tokens before it, as the index encodes chunks (indexer.encoder)."""

    def __init__(self, model: Any, window: int, batch_size: int = 8, progress: bool = True, context: int = 0):
        self.model, self.window, self.batch_size, self.progress = model, window, batch_size, progress
        self.context = context
        self._files: dict[Any, Any] = {}
        self._next_content = 0  # each encoded key's content number (BlockIds)
        self.encoded_tokens = 0

    def get(self, key: Any):
        return self._files[key]

    def memory(self, keys: Sequence[Any]):
        """The cached memories of `keys` (repeats allowed) concatenated in order; None for no keys."""
        from longllama_lsp.model import Memory

        return Memory.concat([self._files[k] for k in keys]) if keys else None

    def ensure(self, items: dict[Any, list[int]], before: dict[Any, list[int]] | None = None) -> None:
        """Encode the files of `items` {key: tokens} not cached yet; `before` {key: the tokens before them}
        gives the first chunk its context (none for a key it lacks)."""
        from tqdm.auto import tqdm

        from longllama_lsp.model import Memory

        todo = {k: v for k, v in items.items() if k not in self._files}
        # (key, start, the context's tokens then the chunk's); the chunk's own slots are the row's last ones
        chunks = [(k, i, self._lead((before or {}).get(k, []) + toks[:i]) + toks[i:i + self.window])
                  for k, toks in todo.items() for i in range(0, len(toks), self.window)]
        chunks.sort(key=lambda c: -len(c[2]))  # similar lengths share a batch: little padding
        parts: dict[Any, dict[int, Any]] = {k: {} for k in todo}
        bar = tqdm(total=sum(len(c[2]) for c in chunks), desc="encode memory", unit="tok", file=sys.stderr,
                   disable=not self.progress or not chunks, dynamic_ncols=True)
        device = self.model.device
        for b in range(0, len(chunks), self.batch_size):
            group = chunks[b:b + self.batch_size]
            ids, mask = _pad([c[2] for c in group], device)
            mem = self.model.encode_memory(ids, attention_mask=mask)
            for row, (k, i, toks) in zip(mem.split_rows(), group, strict=True):
                n = len(todo[k][i:i + self.window])
                parts[k][i] = _slice(row, len(toks) - n, len(toks))
            bar.update(sum(len(c[2]) for c in group))
            self.encoded_tokens += sum(len(c[2]) for c in group)
        bar.close()
        for k in todo:
            self._files[k] = self._with_block_ids(Memory.concat([parts[k][i] for i in sorted(parts[k])]))

    def _lead(self, before: list[int]) -> list[int]:
        """The context a chunk is encoded after: the last `context` tokens before it (none at 0)."""
        return before[-self.context:] if self.context > 0 else []

    def _with_block_ids(self, memory):
        """`memory` with the block ids of its key's content (each key encoded once): where memories
        repeat a key, sparse attention reads one copy (longllama_lsp.model.memory.BlockIds)."""
        from longllama_lsp.model.memory import BlockIds, Memory

        if not len(memory):
            return memory
        size, content = self.model.config.mem_block_size, self._next_content
        self._next_content += 1
        return Memory({i: replace(c, block_ids=BlockIds.of_chunk(content, c.num_tokens, size))
                       for i, c in memory.items()})


def _pad(rows: Sequence[Sequence[int]], device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and 1/0 attention mask."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def _prefix_memory(mem, prefixes: list[int]):
    """Batch memory (B rows) where row b sees only the first prefixes[b] slots; None if all are 0."""
    from longllama_lsp.model import MemCache, Memory
    from longllama_lsp.model.memory import MASK_MIN

    m = max(prefixes)
    if m == 0:
        return None
    mem = _slice(mem, 0, m)
    b = len(prefixes)
    visible = torch.arange(m)[None, :] < torch.tensor(prefixes)[:, None]  # (B, M)
    out = {}
    for i, c in mem.items():
        mask = c.mask.expand(b, -1, -1, -1).masked_fill(~visible.to(c.mask.device)[:, None, :, None], MASK_MIN)
        out[i] = MemCache(c.keys.expand(b, -1, -1, -1), c.values.expand(b, -1, -1, -1), mask)
    return Memory(out)


# ---------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def score_windows(model: Any, windows: Sequence[Sequence[int]], memory_for: Callable[[list[int]], Any],
                  batch_size: int = 4, done: Callable[[int], Any] | None = None) -> tuple[float, int]:
    """(summed NLL, scored tokens) of `windows`, each alone in the local context.

    memory_for(indices) -> the Memory for that batch of windows (batch 1 = shared, or one row per
    window) or None. done(n): called with the number of windows each batch finished (progress).
    """
    total, count = 0.0, 0
    order = [i for i, w in enumerate(windows) if len(w) >= 2]
    if done is not None and len(order) < len(windows):
        done(len(windows) - len(order))  # a one-token window scores nothing
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        ids, mask = _pad([windows[i] for i in idx], model.device)
        # use_cache=True: the window is not appended to memory (no copy of a large memory per call).
        out = model(ids, attention_mask=mask, memory=memory_for(idx), use_cache=True,
                    last_context_length=ids.shape[1])
        logits = out.logits[:, :-1].float()  # (B, T-1, V)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        keep = mask[:, 1:].bool()
        total += float(nll[keep].sum())
        count += int(keep.sum())
        if done is not None:
            done(len(idx))
    return total, count


@dataclass
class FileScore:
    repo: str
    path: str
    tokens: int  # scored target tokens
    nll: dict[str, float] = field(default_factory=dict)  # condition -> summed NLL
    memory_tokens: dict[str, int] = field(default_factory=dict)  # condition -> memory size (own: largest)

    def ppl(self, condition: str) -> float | None:
        return math.exp(self.nll[condition] / self.tokens) if condition in self.nll and self.tokens else None


@dataclass
class EvalReport:
    window: int
    conditions: list[str]
    files: list[FileScore]
    meta: dict[str, Any] = field(default_factory=dict)

    def ppl(self, condition: str) -> float | None:
        """Token-weighted perplexity over every file scored under `condition`."""
        scored = [f for f in self.files if condition in f.nll]
        n = sum(f.tokens for f in scored)
        return math.exp(sum(f.nll[condition] for f in scored) / n) if n else None

    def to_dict(self) -> dict[str, Any]:
        return {"window": self.window, "conditions": self.conditions,
                "perplexity": {c: self.ppl(c) for c in self.conditions},
                "files": [{**asdict(f), "perplexity": {c: f.ppl(c) for c in f.nll}} for f in self.files],
                **self.meta}

    def table(self) -> str:
        rows = [[f"{f.repo}/{f.path}", str(f.tokens)] + [_cell(f.ppl(c), f.ppl("none")) for c in self.conditions]
                for f in self.files]
        total = [["TOTAL", str(sum(f.tokens for f in self.files))]
                 + [_cell(self.ppl(c), self.ppl("none")) for c in self.conditions]]
        mem = [["memory tokens (mean)", ""] + [_mean_mem(self.files, c) for c in self.conditions]]
        head = [["file", "tokens"] + [f"ppl {c}" for c in self.conditions]]
        return _format(head + rows + total + mem)


def _cell(value: float | None, base: float | None) -> str:
    if value is None:
        return "-"
    if base is None or value is base or base == value:
        return f"{value:.3f}"
    return f"{value:.3f} ({100 * (value / base - 1):+.1f}%)"


def _mean_mem(files: list[FileScore], c: str) -> str:
    sizes = [f.memory_tokens[c] for f in files if c in f.memory_tokens]
    return f"{sum(sizes) / len(sizes):.0f}" if sizes else "-"


def _format(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 2, "-" * len(lines[0]))
    return "\n".join(lines)


def evaluate(model: Any, repos: Sequence[EvalRepo], args: EvalArgs, distractor_repos: Iterable[EvalRepo] = (),
             cache: MemoryCache | None = None, progress: bool = True, tokenizer: Any = None) -> EvalReport:
    """Score every held-out file of `repos` under `args.conditions` (see the module docstring); the
    "retrieved" condition reads code as text and needs `tokenizer`."""
    from tqdm.auto import tqdm

    if args.window > model.window:
        raise ValueError(f"eval window {args.window} exceeds the model window {model.window}")
    model.eval()
    cache = cache or MemoryCache(model, args.window, args.batch_size, progress)
    w = args.window
    needs_memory = any(c != "none" for c in args.conditions)
    if needs_memory and not model.config.mem_layers:
        raise ValueError("the model has no memory layers: only the 'none' condition applies")
    if "retrieved" in args.conditions and tokenizer is None:
        raise ValueError("the 'retrieved' condition needs the tokenizer (it retrieves by the code's text)")
    retrieved = RetrievedMemory(model, tokenizer, args) if "retrieved" in args.conditions else None
    distractors = list(distractor_repos)
    scores: list[FileScore] = []
    jobs = [(r, p) for r in repos for p in r.heldout]
    for repo in repos:
        wanted = {}
        if "own" in args.conditions:
            wanted.update({(repo.name, p): repo.files[p] for p in repo.heldout})
        if {"repo", "distract"} & set(args.conditions):
            wanted.update({(repo.name, p): t for p, t in repo.files.items()})
        cache.ensure(wanted)
    distract_mem = _distractor_memories(repos, distractors, args, cache) if "distract" in args.conditions else {}
    windows_of = {(r.name, p): _windows(r.files[p], w, args.max_windows) for r, p in jobs}
    bar = tqdm(total=len(args.conditions) * sum(len(v) for v in windows_of.values()), desc="score",
               unit="window", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for repo, path in jobs:
        windows = windows_of[(repo.name, path)]
        fs = FileScore(repo.name, path, 0)
        for cond in args.conditions:
            if cond == "distract" and distract_mem.get(repo.name) is None:
                bar.update(len(windows))
                continue  # no unrelated repository to draw distractors from
            memory_for, batch, sizes = _condition_memory(cond, repo, path, len(windows), cache, distract_mem,
                                                         retrieved, w)
            nll, n = score_windows(model, windows, memory_for, batch if batch else args.batch_size, bar.update)
            fs.memory_tokens[cond] = max(sizes, default=0)
            fs.nll[cond], fs.tokens = nll, n
        scores.append(fs)
    bar.close()
    meta = {"encoded_tokens": cache.encoded_tokens + (retrieved.cache.encoded_tokens if retrieved else 0),
            "repos": [r.name for r in repos],
            "distractor_ratio": args.distractor_ratio}
    return EvalReport(w, list(args.conditions), scores, meta)


class RetrievedMemory:
    """The "retrieved" condition's memories: per repository its files' chunks as retrieval candidates (with
    one ChunkRetriever, as the server keeps one), and the chunks retrieved so far, each encoded once."""

    def __init__(self, model: Any, tokenizer: Any, args: EvalArgs):
        self.tokenizer, self.args = tokenizer, args
        self.cache = MemoryCache(model, args.chunk_len, args.batch_size, progress=False, context=args.memory_context)
        self._candidates: dict[str, list[Candidate]] = {}  # repository name -> every file's chunks
        self._retrievers: dict[str, ChunkRetriever] = {}

    def memory(self, repo: EvalRepo, path: str, start: int):
        """What completions would read for the code of `path` before its token `start` (None: nothing)."""
        keys, n = self.keys(repo, path, start), self.args.chunk_len
        self.cache.ensure({k: repo.files[k[1]][k[2]:k[2] + n] for k in keys}, {k: repo.files[k[1]][:k[2]] for k in keys})
        return self.cache.memory(keys)

    def keys(self, repo: EvalRepo, path: str, start: int) -> list[tuple[str, str, int]]:
        """(repository, file, first token) of the chunks retrieved for that code, in file order."""
        before = self.tokenizer.decode(repo.files[path][:start], skip_special_tokens=True)
        others = [c for c in self._chunks(repo) if c.path != path]
        retriever = self._retrievers.setdefault(repo.name, ChunkRetriever())
        return sorted(retriever.top(others, Query.before_cursor(before), self.args.retrieve_tokens))

    def _chunks(self, repo: EvalRepo) -> list[Candidate]:
        if repo.name not in self._candidates:
            self._candidates[repo.name] = chunk_candidates(repo.name, repo.files, self.args.chunk_len, self.tokenizer)
        return self._candidates[repo.name]


def chunk_candidates(repo: str, files: Mapping[str, Sequence[int]], chunk_len: int, tokenizer: Any) -> list[Candidate]:
    """Every file's `chunk_len`-token chunks as retrieval candidates, keyed (repo, path, first token), in path
    order; their text decoded, the names they define read from it (`defined_in`: token windows have no index
    symbol)."""
    out = []
    for path, ids in sorted(files.items()):
        for i in range(0, len(ids), chunk_len):
            text = tokenizer.decode(ids[i:i + chunk_len], skip_special_tokens=True)
            out.append(Candidate((repo, path, i), f"{repo}:{path}:{i}", len(ids[i:i + chunk_len]),
                                 lambda text=text: text, defined_in(text), path))
    return out


def _windows(toks: list[int], w: int, max_windows: int | None) -> list[list[int]]:
    return [toks[i:i + w] for i in range(0, len(toks), w)][:max_windows]


def _condition_memory(cond: str, repo: EvalRepo, path: str, n_windows: int, cache: MemoryCache, distract_mem: dict,
                      retrieved: RetrievedMemory | None, w: int) -> tuple[Callable[[list[int]], Any], int, list[int]]:
    """(memory_for(window indices) for score_windows, batch size (0: any), memory sizes seen, filled as
    it scores) of `cond` for the `n_windows` windows of held-out file `path`."""
    from longllama_lsp.model import Memory

    sizes: list[int] = []
    if cond == "none":
        return (lambda idx: None), 0, sizes
    if cond == "own":  # each window reads the file's windows before it
        file_mem = cache.get((repo.name, path))
        sizes.append((n_windows - 1) * w)
        return (lambda idx: _prefix_memory(file_mem, [i * w for i in idx])), 0, sizes
    if cond == "retrieved":  # one memory per window: batches of one

        def window_memory(idx: list[int]):
            mem = retrieved.memory(repo, path, idx[0] * w)
            sizes.append(mem.num_tokens if mem is not None else 0)
            return mem

        return window_memory, 1, sizes
    parts = [cache.get((repo.name, p)) for p in sorted(repo.files) if p != path]
    if cond == "distract":
        parts.append(distract_mem[repo.name])
    mem = Memory.concat(parts)
    mem = mem if len(mem) else None
    sizes.append(mem.num_tokens if mem is not None else 0)
    return (lambda idx: mem), 0, sizes


def _distractor_memories(repos: Sequence[EvalRepo], extra: Sequence[EvalRepo], args: EvalArgs,
                         cache: MemoryCache) -> dict[str, Any]:
    """Per repository: ratio x its token count of memory from the other repositories' files."""
    from longllama_lsp.model import Memory

    out: dict[str, Any] = {}
    pool = list(repos) + list(extra)
    for repo in repos:
        others = [(r.name, p, t) for r in pool if r.name != repo.name for p, t in sorted(r.files.items())]
        random.Random(f"{args.seed}:{repo.name}").shuffle(others)
        need = int(args.distractor_ratio * repo.tokens)
        picked, have = [], 0
        for name, p, t in others:
            if have >= need:
                break
            picked.append(((name, p), t))
            have += len(t)
        if not picked:
            logger.warning("no distractors for %s: give other repositories (--distractors-from)", repo.name)
            out[repo.name] = None
            continue
        cache.ensure(dict(picked))
        mem = Memory.concat([cache.get(k) for k, _ in picked])
        out[repo.name] = _slice(mem, 0, min(need, mem.num_tokens)) if need else None
    return out


def write_report(report: EvalReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
