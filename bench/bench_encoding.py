"""What independent chunk encoding (what the indexer ships) costs against sequential encoding, in
perplexity of held-out code, with the default model on CPU.

For each of a few files of one stdlib package, the last `--window` tokens are held out and scored
with that window as the local context; memory comes from the chunks before it (the indexer's own
tree-sitter chunks of `--chunk-tokens`), built three ways:

    independent  each chunk encoded alone (`Encoder.encode`): what the index stores, reusable anywhere
    sequential   each chunk encoded after the memory of the chunks before it
                 (`model.encode_memory(ids, memory=earlier)`): the reference's behaviour across windows
    stream       the text before the window fed as one input (`encode_memory(prefix)`): windows of 2048
                 tokens, so chunks also see each other as local context (the reference, whole file)

Two scopes: "file" (memory = the file's own text before the window) and "package" (memory = the
text before the window of every selected file, in path order; each window is scored with all of it).
Spec §2.5: the first memory layer's keys/values do not depend on earlier memory, later ones do; the
table of key differences per layer checks that.

    python bench/bench_encoding.py [--quick] [--package email] [--files 5] [--prefix-tokens 1536]
                                   [--json out.json]

About 11 minutes on 2 busy cores (5 files); --quick about 3.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", default="email", help="stdlib package to draw files from (default: email)")
    ap.add_argument("--files", type=int, default=5, help="files scored (default 5)")
    ap.add_argument("--window", type=int, default=512, help="held-out tokens per file, scored (default 512)")
    ap.add_argument("--prefix-tokens", type=int, default=1536,
                    help="memory source per file: at most this many tokens right before the window (default 1536)")
    ap.add_argument("--chunk-tokens", type=int, default=256, help="chunk budget, as `longllama index` (default 256)")
    ap.add_argument("--quick", action="store_true", help="3 files, 1024-token prefixes, 384-token windows")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    return ap.parse_args()


def split_file(text: str, count, window: int, prefix_tokens: int) -> tuple[str, str] | None:
    """(prefix, held-out) cut at line boundaries: held-out >= window tokens, prefix <= prefix_tokens."""
    lines = text.splitlines(keepends=True)
    cut = len(lines)
    while cut > 0 and count("".join(lines[cut:])) < window:
        cut -= 1
    start = cut
    while start > 0 and count("".join(lines[start - 1:cut])) <= prefix_tokens:
        start -= 1
    prefix = "".join(lines[start:cut])
    return (prefix, "".join(lines[cut:])) if count(prefix) >= prefix_tokens // 2 else None


def pick_files(package: str, n: int, count, window: int, prefix_tokens: int) -> list[tuple[str, str, str]]:
    """n files of the package, largest first among those long enough: (name, prefix, held-out)."""
    root = Path(json.__file__).parent.parent / package
    out = []
    for path in sorted(root.rglob("*.py"), key=lambda p: -p.stat().st_size):
        if "test" in path.parts:
            continue
        parts = split_file(path.read_text(encoding="utf-8"), count, window, prefix_tokens)
        if parts:
            out.append((path.relative_to(root.parent).as_posix(), *parts))
        if len(out) == n:
            break
    return sorted(out)


def chunk_ids(name: str, prefix: str, enc, chunk_tokens: int) -> list[list[int]]:
    from indexer.chunker import chunk_file

    chunks = chunk_file(name, prefix.encode("utf-8"), enc.count_tokens, chunk_tokens).chunks
    return [ids for c in chunks if (ids := enc.token_ids(c.text))]


def encode_independent(model, chunks: list[list[int]]):
    """Each chunk alone, as `indexer.encoder.Encoder` does on CPU (one chunk per forward)."""
    import torch

    from longllama_lsp.model.memory import Memory

    return Memory.concat([model.encode_memory(torch.tensor([ids])) for ids in chunks])


def encode_sequential(model, chunks: list[list[int]], start=None):
    """Each chunk after the memory of all chunks before it (and `start`, if given)."""
    import torch

    from longllama_lsp.model.memory import Memory

    memory = start
    for ids in chunks:
        part = model.encode_memory(torch.tensor([ids]), memory=memory)
        memory = part if memory is None else Memory.concat([memory, part])
    return memory


def encode_stream(model, ids: list[int]):
    import torch

    return model.encode_memory(torch.tensor([ids]))


def nll(model, ids: list[int], memory) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given ids[:-1] as local context, and the count."""
    import torch

    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model(x, memory=memory, labels=x, use_cache=False, last_context_length=len(ids))
    return float(out.loss) * (len(ids) - 1), len(ids) - 1


def key_differences(a, b) -> dict[int, float]:
    """Per memory layer: max |a - b| / max |b| over keys (0.0 = identical)."""
    return {i: float((a[i].keys.float() - b[i].keys.float()).abs().max() / b[i].keys.float().abs().max())
            for i in a}


def main() -> None:
    args = parse_args()
    if args.quick:
        args.files, args.prefix_tokens, args.window = 3, 1024, 384
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from indexer.encoder import Encoder
    from longllama_lsp.model.loading import load_model, load_tokenizer
    from longllama_lsp.model.memory import Memory
    from longllama_lsp.resolve import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model_dir = resolve_model()
    model, tok = load_model(model_dir).eval(), load_tokenizer(model_dir)
    enc = Encoder(model, tok)
    files = pick_files(args.package, args.files, enc.count_tokens, args.window, args.prefix_tokens)
    print(f"model {model_dir.name}: mem_layers {model.config.mem_layers}, window {model.window}; "
          f"threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}", flush=True)

    per_file = []
    for name, prefix, held in files:
        chunks = chunk_ids(name, prefix, enc, args.chunk_tokens)
        window = enc.token_ids(held)[: args.window]
        per_file.append({"name": name, "chunks": chunks, "window": window,
                         "prefix_ids": [t for c in chunks for t in c]})
        print(f"  {name}: {len(chunks)} chunks, {sum(map(len, chunks))} memory tokens, window {len(window)}",
              flush=True)

    t0 = time.perf_counter()
    for f in per_file:
        f["independent"] = encode_independent(model, f["chunks"])
        f["sequential"] = encode_sequential(model, f["chunks"])
        f["stream"] = encode_stream(model, f["prefix_ids"])
    t_file = time.perf_counter() - t0
    print(f"file memories: {t_file:.0f} s", flush=True)

    # package scope: every file's prefix, in path order
    t0 = time.perf_counter()
    package = {
        "independent": Memory.concat([f["independent"] for f in per_file]),
        "sequential": encode_sequential(model, [c for f in per_file for c in f["chunks"]]),
        "stream": encode_stream(model, [t for f in per_file for t in f["prefix_ids"]]),
    }
    t_pkg = time.perf_counter() - t0
    print(f"package memories: {t_pkg:.0f} s ({package['independent'].num_tokens} tokens)", flush=True)

    variants = ("none", "independent", "sequential", "stream")
    totals = {(scope, v): [0.0, 0] for scope in ("file", "package") for v in variants}
    for f in per_file:
        for scope in ("file", "package"):
            for v in variants:
                memory = None if v == "none" else (f[v] if scope == "file" else package[v])
                if scope == "package" and v == "none":
                    totals[(scope, v)] = totals[("file", "none")]
                    continue
                s, n = nll(model, f["window"], memory)
                totals[(scope, v)][0] += s
                totals[(scope, v)][1] += n
        print(f"  scored {f['name']}", flush=True)

    ppl = {k: math.exp(s / n) for k, (s, n) in totals.items()}
    diffs = {"file": {}, "package": key_differences(package["independent"], package["sequential"])}
    for f in per_file:
        for layer, d in key_differences(f["independent"], f["sequential"]).items():
            diffs["file"][layer] = max(diffs["file"].get(layer, 0.0), d)

    tokens = totals[("file", "none")][1]
    print(f"\nperplexity of {tokens} held-out tokens ({len(per_file)} windows of <= {args.window} tokens, "
          f"package {args.package}); change vs no memory in brackets\n")
    print("| memory scope | memory tokens | none | independent | sequential | stream |")
    print("|---|---|---|---|---|---|")
    mem_tokens = {"file": sum(f["independent"].num_tokens for f in per_file) // len(per_file),
                  "package": package["independent"].num_tokens}
    for scope in ("file", "package"):
        base = ppl[(scope, "none")]
        cells = [f"{base:.3f}"] + [f"{ppl[(scope, v)]:.3f} ({100 * (ppl[(scope, v)] / base - 1):+.1f}%)"
                                   for v in variants[1:]]
        label = f"~{mem_tokens[scope]} per file" if scope == "file" else str(mem_tokens[scope])
        print(f"| {scope} | {label} | " + " | ".join(cells) + " |")
    print("\nkeys, independent vs sequential, max |diff| / max |key| per memory layer:")
    for scope in ("file", "package"):
        print(f"  {scope}: " + ", ".join(f"layer {k}: {v:.3g}" for k, v in sorted(diffs[scope].items())))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "files": [f["name"] for f in per_file],
            "held_out_tokens": tokens, "memory_tokens": mem_tokens,
            "perplexity": {f"{s}/{v}": round(p, 4) for (s, v), p in ppl.items()},
            "key_rel_diff": {s: {str(k): v for k, v in d.items()} for s, d in diffs.items()},
            "seconds": {"file_memories": round(t_file, 1), "package_memories": round(t_pkg, 1)}}, indent=2))


if __name__ == "__main__":
    main()
