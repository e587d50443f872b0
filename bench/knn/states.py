"""kNN-LM over a repository's token states (stop 42): the datastore and its cross-file identifier NLL.

kNN-LM (Khandelwal et al. 2020): beside the model's next-token distribution, look the current state up among
the states at every token of the repository and vote for the tokens that followed the nearest ones:
    p = (1 - lam) p_model + lam p_knn,  p_knn(v) = sum over the K nearest with next token v of
        softmax(-d / (T d_nearest)),  d = squared L2 distance between states.
The state is the last layer's FFN input (its post_attention_layernorm output), as kNN-LM found best.

    python bench/knn/states.py --repo /work/data/eval/requests --repo ... --stores DIR [--json OUT]

1. DIR/store-<repo>.pt per repository (built once, reused): {path: (states (T-1, H) float16, next ids (T-1,))}
   for every Python file as `longllama eval --task crossfile-ids` loads them (bos + tokens + eos), each
   position encoded in windows of 512 tokens with at least 256 before it (no memory);
2. on that eval's sample (seed 0, 3 files x 3 spans per repository, 512-token budget), the retrieved-memory
   system's NLL and top-1 over all span tokens, cross-file identifier tokens and their first tokens, alone
   and with kNN over the other files' states for a grid of lam, T, K.
`bench/knn/sitecustomize.py` puts the same lookup into the language server for bench/crossfile/run.py.
`--state kv:L` looks up layer L's key and value projections instead (stores `store-<repo>-kvL.pt`). The
product's lookup (longllama_lsp/knn.py) uses the last memory layer's, 23 for the shipped model (memory at 17,
18, 23): `kv:23`. Stop 43's NLL rows used `kv:21`, the layer two below it, which keeps no memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from itertools import accumulate
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from finetune.commands import load_eval_model  # noqa: E402
from finetune.evaluate import MemoryCache  # noqa: E402
from finetune.skill_eval import Repo, SkillArgs, chunks_memory, load_repo, pick_spans, retrieved_chunks  # noqa: E402
from longllama_lsp.knn import mixture  # noqa: E402
from longllama_lsp.lexical import ChunkRetriever  # noqa: E402

WINDOW, CONTEXT = 512, 256


class StateProbe:
    """The state of the model's latest forward, (B, T, H), caught by hooks: `ffn` the last layer's FFN input;
    `kv:L` / `k:L` / `v:L` memory layer L's unrotated key and/or value projections (what the index keeps)."""

    def __init__(self, model, kind: str = "ffn"):
        self.kind = kind
        self.states: torch.Tensor | None = None
        self._parts: dict[str, torch.Tensor] = {}
        if kind == "ffn":
            model.model.layers[-1].post_attention_layernorm.register_forward_hook(self._catch)
            return
        which, layer = kind.split(":")
        attn = model.model.layers[int(layer)].self_attn
        self._order = [n for n in "kv" if n in which]
        for n in self._order:
            getattr(attn, f"{n}_proj").register_forward_hook(lambda m, i, o, n=n: self._catch_part(n, o))

    def _catch(self, module, inputs, output) -> None:
        self.states = output.detach().float()

    def _catch_part(self, name: str, output: torch.Tensor) -> None:
        self._parts[name] = output.detach().float()
        if len(self._parts) == len(self._order):
            self.states = torch.cat([self._parts.pop(n) for n in self._order], -1)  # (B, T, Hkv * D * parts)


@torch.no_grad()
def file_states(model, probe: StateProbe, ids: list[int]) -> torch.Tensor:
    """States (len(ids) - 1, H) at each position that has a next token, windows of WINDOW with CONTEXT before."""
    parts, done = [], 0
    while done < len(ids) - 1:
        lo = max(0, done - CONTEXT)
        hi = min(len(ids), lo + WINDOW)
        x = torch.tensor([ids[lo:hi]])
        model(x, use_cache=False, last_context_length=x.shape[1])
        stop = min(hi, len(ids) - 1)
        parts.append(probe.states[0, done - lo:stop - lo])
        done = stop
    return torch.cat(parts)


def build_store(model, probe: StateProbe, repo: Repo, path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if path.is_file():
        return torch.load(path, weights_only=True)
    store = {}
    for p, f in sorted(repo.files.items()):
        store[p] = (file_states(model, probe, f.ids).half(), torch.tensor(f.ids[1:]))
    torch.save(store, path)
    return store


class Datastore:
    """A repository's states as one matrix, the rows of one file maskable (the file being completed)."""

    def __init__(self, store: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.paths = sorted(store)
        self.keys = torch.cat([store[p][0].float() for p in self.paths])  # (N, H)
        self.norms = (self.keys * self.keys).sum(-1)  # (N,)
        self.next_ids = torch.cat([store[p][1] for p in self.paths])  # (N,)
        sizes = [len(store[p][1]) for p in self.paths]
        self.rows = dict(zip(self.paths, zip(accumulate([0, *sizes[:-1]]), sizes, strict=True), strict=True))
        # path -> (its first row, its rows)

    def others(self, path: str) -> torch.Tensor:
        """(N,) bool: rows not of `path`."""
        out = torch.ones(len(self.next_ids), dtype=torch.bool)
        if path in self.rows:
            first, n = self.rows[path]
            out[first:first + n] = False
        return out

    def chunks(self, keys: list[tuple], chunk_len: int) -> torch.Tensor:
        """(N,) bool: the rows of chunks `keys` ((repo, path, start) in a file's ids, skill_eval's): the states
        at the chunk's tokens, each predicting the token after it."""
        out = torch.zeros(len(self.next_ids), dtype=torch.bool)
        for _, path, start in keys:
            first, n = self.rows[path]
            out[first + min(start, n):first + min(start + chunk_len, n)] = True
        return out

    def nearest(self, queries: torch.Tensor, allowed: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances, rows), each (Q, k), of the k nearest allowed rows to queries (Q, H)."""
        d = self.norms[None] - 2 * queries @ self.keys.T + (queries * queries).sum(-1, keepdim=True)
        d = d.masked_fill(~allowed[None], float("inf"))
        return d.topk(k, largest=False)


class Tally:
    """NLL and top-1 per token class (all, cross-file identifier, its first token) for one system."""

    def __init__(self):
        self.sums = {m: [0.0, 0, 0] for m in ("all", "xid", "first")}

    def add(self, logp: torch.Tensor, target: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
        lp = logp.gather(-1, target[:, None])[:, 0]
        top = logp.argmax(-1) == target
        for m, mask in masks.items():
            s = self.sums[m]
            s[0] += float(-lp[mask].sum())
            s[1] += int(top[mask].sum())
            s[2] += int(mask.sum())

    def summary(self) -> dict[str, dict[str, float]]:
        return {m: {"nll": round(s[0] / s[2], 4), "top1": round(s[1] / s[2], 4), "tokens": s[2]}
                for m, s in self.sums.items() if s[2]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", action="append", required=True, help="a held-out repository (repeat)")
    p.add_argument("--stores", type=Path, required=True, help="folder of the per-repository datastores")
    p.add_argument("--lams", default="0.1,0.2,0.3,0.5")
    p.add_argument("--temps", default="0.25,0.5,1")
    p.add_argument("--ks", default="16,64,256")
    p.add_argument("--datastore-tokens", type=int, default=0,
                   help="only the other files' chunks that lexical retrieval picks for the code before the span, up "
                        "to N tokens (what a bounded lookup would search); 0: every other file's states")
    p.add_argument("--state", default="ffn", help="ffn (the last layer's FFN input) or kv:L, k:L, v:L (memory layer "
                   "L's key/value projections, which the index already keeps)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--time-lookup", default="", help="only time one decode step's lookup (one query) against N "
                   "random states, N a comma list (e.g. 50000,100000,1000000), and exit")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.time_lookup:
        for n in (int(x) for x in args.time_lookup.split(",")):
            print(f"{n} states: {time_lookup(n) * 1000:.1f} ms per lookup ({args.threads} threads, load "
                  f"{Path('/proc/loadavg').read_text().split()[0]})")
        return 0
    args.stores.mkdir(parents=True, exist_ok=True)
    model, tokenizer, _ = load_eval_model(None, "cpu", None)
    probe = StateProbe(model, args.state)
    sa = SkillArgs(budget=512, span_len=128, chunk_len=256, memory_tokens=2048, retrieve_tokens=4096,
                   memory_context=256, files_per_repo=3, spans_per_file=3, batch_size=4, seed=0)
    grid = [(float(lam), float(t), int(k)) for lam in args.lams.split(",") for t in args.temps.split(",")
            for k in args.ks.split(",")]
    tallies = {"retrieved": Tally(), **{f"knn lam={lam} T={t} K={k}": Tally() for lam, t, k in grid}}
    cache = MemoryCache(model, sa.chunk_len, sa.batch_size, progress=False, context=sa.memory_context)
    t0 = time.perf_counter()
    for root in args.repo:
        repo = load_repo(root, tokenizer)
        suffix = "" if args.state == "ffn" else "-" + args.state.replace(":", "")
        store = Datastore(build_store(model, probe, repo, args.stores / f"store-{repo.name}{suffix}.pt"))
        print(f"{repo.name}: {len(store.next_ids)} states ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        score_spans(model, tokenizer, probe, repo, store, sa, cache, grid, tallies, args.datastore_tokens)
    out = {name: t.summary() for name, t in tallies.items()}
    ranked = sorted(out.items(), key=lambda kv: kv[1]["first"]["nll"])
    shown = [kv for kv in ranked[:10] if kv[0] != "retrieved"] + [("retrieved", out["retrieved"])]
    for name, s in shown:
        print(f"{name:28s} " + "  ".join(f"{m} {v['nll']:.3f} / {v['top1']:.1%}" for m, v in s.items()))
    if args.json:
        facts = {"state": args.state, "datastore_tokens": args.datastore_tokens or "all", "seconds": round(time.perf_counter() - t0, 1),
                 "load": Path("/proc/loadavg").read_text().split()[:3]}
        args.json.write_text(json.dumps({"systems": out, **facts}, indent=1) + "\n")
    return 0


def time_lookup(n: int, hidden: int = 576, k: int = 64, repeats: int = 20) -> float:
    """Seconds per nearest-k lookup of one query among n random float32 states (the decode step's added cost)."""
    n_files = 100
    store = {f"f{i}": (torch.randn(n // n_files, hidden).half(), torch.randint(0, 49152, (n // n_files,)))
             for i in range(n_files)}
    ds = Datastore(store)
    allowed = ds.others("f0")
    q = torch.randn(1, hidden)
    ds.nearest(q, allowed, k)
    t0 = time.perf_counter()
    for _ in range(repeats):
        ds.nearest(q, allowed, k)
    return (time.perf_counter() - t0) / repeats


@torch.no_grad()
def score_spans(model, tokenizer, probe, repo, store, sa, cache, grid, tallies, datastore_tokens: int = 0) -> None:
    """Each span scored with retrieved memory (the skill eval's `retrieved`), then with kNN on top."""
    retriever = ChunkRetriever()
    for s in pick_spans(repo, sa):
        f = repo.files[s.path]
        prompt = f.ids[max(0, s.start - (sa.budget - sa.span_len)):s.start]
        target = torch.tensor(f.ids[s.start:s.end])
        memory = chunks_memory(cache, repo, retrieved_chunks(repo, s, sa, tokenizer, retriever), sa.chunk_len)
        x = torch.tensor([prompt + f.ids[s.start:s.end]])
        out = model(x, memory=memory, use_cache=False, last_context_length=x.shape[1])
        pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target))
        logp = torch.log_softmax(out.logits[0, pos].float(), -1)  # (S, V)
        flags = torch.tensor(f.flags[s.start:s.end])
        masks = {"all": torch.ones_like(flags), "xid": flags, "first": torch.tensor(f.starts[s.start:s.end])}
        tallies["retrieved"].add(logp, target, masks)
        allowed = store.others(s.path)
        if datastore_tokens:
            wide = dataclasses.replace(sa, retrieve_tokens=datastore_tokens)
            allowed &= store.chunks(retrieved_chunks(repo, s, wide, tokenizer, retriever), sa.chunk_len)
        k_max = min(max(k for _, _, k in grid), int(allowed.sum()))
        dist, rows = store.nearest(probe.states[0, pos], allowed, k_max)
        for lam, t, k in grid:
            mixed = mixture(logp, dist[:, :k], store.next_ids[rows[:, :k]], lam, t) if k_max else logp
            tallies[f"knn lam={lam} T={t} K={k}"].add(mixed, target, masks)


if __name__ == "__main__":
    raise SystemExit(main())
