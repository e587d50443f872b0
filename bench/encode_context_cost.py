"""What encoding each chunk after the text before it costs the indexer, A/B in one process.

    python bench/encode_context_cost.py --repo /work/data/eval/flask [--chunks 48] [--rounds 3]

The repository's files cut by the indexer's chunker (256-token chunks), keyed as the indexer keys them
(indexer.encoder.keyed, CONTEXT_CHARS), then the same chunks encoded by indexer.encoder.Encoder alone and
after their contexts, alternating per round (the machine's speed drifts). Reports chunk tokens per second
(what an index holds) and model tokens per second for both, on the bundled default model, one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from indexer.chunker import chunk_file
from indexer.encoder import Encoder, keyed
from indexer.schema import CONTEXT_CHARS
from indexer.walker import WalkRules, walk_with_skips


def chunks_of(repo: Path, encoder: Encoder, limit: int) -> list[tuple[str, str]]:
    """(context, text) of the first `limit` chunks that have a context, file by file."""
    out = []
    for d in walk_with_skips(repo, WalkRules(), read=False):
        if d.file is None or not d.file.path.endswith(".py"):
            continue
        chunked = chunk_file(d.file.path, d.file.abs_path.read_bytes(), encoder.count_tokens, 256)
        out += [(ctx, c.text) for c, ctx in keyed(chunked.chunks, CONTEXT_CHARS) if ctx]
        if len(out) >= limit:
            return out[:limit]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--chunks", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    torch.set_num_threads(1)
    from finetune.commands import load_eval_model

    model, tok, _ = load_eval_model(None, "cpu", None)
    encoder = Encoder(model, tok)
    pairs = chunks_of(a.repo, encoder, a.chunks)
    texts, contexts = [t for _, t in pairs], [c for c, _ in pairs]
    chunk_tokens = sum(len(encoder.token_ids(t)) for t in texts)
    context_tokens = sum(len(encoder.context_ids(c, len(encoder.token_ids(t)))) for c, t in pairs)
    seconds = {"alone": [], "after context": []}
    for _ in range(a.rounds):
        for name, ctx in (("alone", None), ("after context", contexts)):
            t0 = time.perf_counter()
            encoder.encode(texts, contexts=ctx)
            seconds[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in seconds.items()}
    out = {"repo": a.repo.name, "chunks": len(texts), "chunk_tokens": chunk_tokens, "context_tokens": context_tokens,
           "seconds": seconds, "chunk_tokens_per_s": {k: round(chunk_tokens / v, 1) for k, v in best.items()},
           "cost_ratio": round(best["after context"] / best["alone"], 2),
           "load": os.getloadavg()}
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
