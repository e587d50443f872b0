"""Does the model under-read its memory? A bias added to every memory score, measured on cross-file
identifier tokens (the skill eval's spans and its `retrieved` memory).

    python bench/memory_bias.py --biases=-1,-0.5,0,0.5,1,2 [--seed S] [--files-per-repo F] --json OUT

Memory attention is one softmax over local and memory keys (spec §2.2); adding b to each memory score
multiplies the memory's share of attention mass by e^b before normalising, at every memory layer. For
every span of `longllama eval --task crossfile-ids` (same spans, same BM25 retrieval of 4,096 tokens of
256-token chunks, each encoded after the 256 tokens before it, as the eval's `retrieved` system) the
cross-file identifier NLL with no memory and with the retrieved memory under each bias. Bundled default
model (or --model), dense attention, held-out repositories under --eval-root (requests, flask, click).
Encoding runs without memory, so one encode per chunk serves every bias.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from finetune.commands import load_eval_model
from finetune.evaluate import MemoryCache
from finetune.skill_eval import (
    SkillArgs,
    SystemScore,
    _score,
    chunks_memory,
    load_repo,
    pick_spans,
    retrieved_chunks,
)
from longllama_lsp.lexical import ChunkRetriever
from longllama_lsp.model import attention


@contextlib.contextmanager
def memory_bias(b: float):
    """attention._one_softmax with b added to the memory scores (masked slots stay masked: min + b)."""
    orig = attention._one_softmax
    attention._one_softmax = lambda s_loc, v, s_mem, mem_v=None: orig(s_loc, v, s_mem + b, mem_v)
    try:
        yield
    finally:
        attention._one_softmax = orig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--biases", default="-1,-0.5,0,0.5,1,2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--files-per-repo", type=int, default=3)
    p.add_argument("--model", default=None)
    p.add_argument("--eval-root", type=Path, default=Path("/work/data/eval"))
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args()
    biases = [float(x) for x in a.biases.split(",")]
    model, tok, _ = load_eval_model(a.model, "cpu", None)
    args = SkillArgs(budget=512, span_len=128, chunk_len=256, retrieve_tokens=4096, files_per_repo=a.files_per_repo,
                     spans_per_file=3, seed=a.seed)
    cache = MemoryCache(model, args.chunk_len, 1, progress=False, context=256)  # one row a batch: no padding
    scores = {"none": SystemScore(), **{f"bias {b:+g}": SystemScore() for b in biases}}
    per_repo: dict[str, dict[str, SystemScore]] = {}
    ctx = args.budget - args.span_len
    t0 = time.time()
    for name in ("requests", "flask", "click"):
        repo = load_repo(a.eval_root / name, tok)
        retriever = ChunkRetriever()
        rs = per_repo.setdefault(name, {k: SystemScore() for k in scores})
        for s in pick_spans(repo, args):
            f = repo.files[s.path]
            target, fl, prompt = f.ids[s.start:s.end], f.flags[s.start:s.end], f.ids[max(0, s.start - ctx):s.start]
            st = f.starts[s.start:s.end]
            memory = chunks_memory(cache, repo, retrieved_chunks(repo, s, args, tok, retriever), args.chunk_len)
            _score(model, [prompt], [target], [fl], [st], None, scores["none"], rs["none"])
            for b in biases:
                with memory_bias(b):
                    _score(model, [prompt], [target], [fl], [st], memory, scores[f"bias {b:+g}"], rs[f"bias {b:+g}"])
            print(f"{name} {s.path} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    out = {"systems": {k: v.summary() for k, v in scores.items()},
           "per_repo": {r: {k: v.summary()["xid_nll"] for k, v in d.items()} for r, d in per_repo.items()},
           "seed": a.seed, "files_per_repo": a.files_per_repo, "model": a.model or "bundled default",
           "load": Path("/proc/loadavg").read_text().split()[:3], "seconds": round(time.time() - t0)}
    print(json.dumps(out, indent=1))
    a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
