"""How retrieved chunks are encoded, measured on cross-file identifier tokens (the skill eval's spans).

    python bench/xid_encoding.py --mode joint|prev --tokens N [--seed S] [--files-per-repo F] --json OUT

For every span of `longllama eval --task crossfile-ids` (same spans, same BM25 retrieval of 4,096 tokens
of 256-token chunks as its `retrieved` system, finetune/skill_eval.py) the cross-file identifier NLL with
  none   no memory
  alone  each retrieved chunk encoded on its own (what the index stored before stop 34; = the eval's
         `retrieved` with --memory-context 0)
  joint  the retrieved chunks concatenated in file order and encoded together, N tokens at a time
  prev   each retrieved chunk encoded after the N tokens before it in its file, the chunk's keys kept
         (what the index stores since stop 34; = the eval's `retrieved` with --memory-context N)
Bundled default model, dense attention, held-out repositories under --eval-root (requests, flask, click).
"""

from __future__ import annotations

import argparse
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
    chunk_ids,
    chunks_memory,
    load_repo,
    pick_spans,
    retrieved_chunks,
)
from longllama_lsp.lexical import ChunkRetriever


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("joint", "prev"), required=True)
    p.add_argument("--tokens", type=int, required=True, help="joint: tokens per encode; prev: context tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--files-per-repo", type=int, default=3)
    p.add_argument("--eval-root", type=Path, default=Path("/work/data/eval"))
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args()
    model, tok, _ = load_eval_model(None, "cpu", None)
    args = SkillArgs(budget=512, span_len=128, chunk_len=256, retrieve_tokens=4096, files_per_repo=a.files_per_repo,
                     spans_per_file=3, seed=a.seed)
    alone = MemoryCache(model, args.chunk_len, 4, progress=False)
    together = MemoryCache(model, a.tokens, 1, progress=False)
    prev = MemoryCache(model, args.chunk_len, 1, progress=False, context=a.tokens)  # one row a batch: no padding
    scores = {"none": SystemScore(), "alone": SystemScore(), a.mode: SystemScore()}
    ctx = args.budget - args.span_len
    t0 = time.time()
    for name in ("requests", "flask", "click"):
        repo = load_repo(a.eval_root / name, tok)
        retriever = ChunkRetriever()
        for s in pick_spans(repo, args):
            f = repo.files[s.path]
            target, fl, prompt = f.ids[s.start:s.end], f.flags[s.start:s.end], f.ids[max(0, s.start - ctx):s.start]
            st = f.starts[s.start:s.end]
            keys = retrieved_chunks(repo, s, args, tok, retriever)
            _score(model, [prompt], [target], [fl], [st], None, scores["none"])
            _score(model, [prompt], [target], [fl], [st], chunks_memory(alone, repo, keys, args.chunk_len), scores["alone"])
            if a.mode == "joint":
                together.ensure({tuple(keys): [i for k in keys for i in chunk_ids(repo, k, args.chunk_len)]})
                memory = together.memory([tuple(keys)])
            else:
                memory = chunks_memory(prev, repo, keys, args.chunk_len)
            _score(model, [prompt], [target], [fl], [st], memory, scores[a.mode])
            print(f"{name} {s.path} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    out = {k: v.summary() for k, v in scores.items()}
    out.update(mode=a.mode, tokens=a.tokens, seed=a.seed, files_per_repo=a.files_per_repo,
               load=Path("/proc/loadavg").read_text().split()[:3])
    print(json.dumps(out, indent=1))
    a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
