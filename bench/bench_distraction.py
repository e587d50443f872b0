"""The FoT paper's distraction result at small scale (issue #5): does crossbatch training with
negatives (d > 1) make a memory layer degrade less when memory fills up with other documents?

Protocol (everything through the repo's FoT loop, finetune.train.train_loop + finetune.data):

1. A small LongLLaMA from random init (default: 4 layers, hidden 256, memory layer 2, window 128,
   the SmolLM2 tokenizer restricted to its 8192 most frequent ids on the training code, the rest
   -> <unk>, so the LM head stays cheap on CPU) is trained on Django + SQLAlchemy
   (/work/data/train) with positives only (pack 2, cross_batch_range 1: the second chunk of each
   pack sees the first, its own document's previous chunk). This shared base trains for
   --base-minutes (its step count S is then fixed).
2. Two copies continue from the base checkpoint (same optimizer state, data order, seed and
   step count N): `d=1` keeps range 1; `d=D` uses range D (d_schedule [(S, D)]): the second row
   of each pack sees its positive plus up to D-1 chunks of other documents from earlier packs of
   the micro-batch (rows never wrap around, so earlier packs see fewer). Only the range differs.
3. Held-out code (click, flask, requests from /work/data/eval: different packages) is cut into
   windows of T tokens; each window with a full previous chunk is scored as the local context:
     none      no memory
     own+0     memory = the document's own previous chunk (encode_memory, independently)
     own+8     own + one chunk of each of 8 other documents (distractors)
     own+64    own + one chunk of each of 64 other documents
   Distractor documents are files of other installed packages (jinja2, urllib3, rich, tqdm,
   packaging, pluggy: in no training or scored set), one fixed chunk per file; a window's 8 are
   the first 8 of its 64; every model sees exactly the same memories.
4. Noise: two independent distractor draws, two disjoint halves of the windows, and a paired
   cluster bootstrap over scored files of the difference in degradation between the two models.

    nice -n 15 python bench/bench_distraction.py                 # ~70 min on 2 busy cores
    nice -n 15 python bench/bench_distraction.py --smoke         # ~3 min, checks the pipeline
    ... --resume                                                  # continue a killed run

Writes bench/results/distraction.json and distraction.md (work files under runs/distraction).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facts import cpu_model  # noqa: E402

SITE = Path(torch.__file__).resolve().parents[1]
DEFAULT_TOKENIZER = sorted(p for p in Path("~/.cache/longllama/models").expanduser().glob("smollm2-135m-instruct-*")
                           if (p / "tokenizer.json").is_file())
DISTRACTOR_PACKAGES = ("jinja2", "urllib3", "rich", "tqdm", "packaging", "pluggy")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "distraction")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "distraction.json")
    ap.add_argument("--md", type=Path, default=ROOT / "bench" / "results" / "distraction.md")
    ap.add_argument("--train", nargs="+", default=["/work/data/train/Django", "/work/data/train/SQLAlchemy"])
    ap.add_argument("--eval", nargs="+", default=["/work/data/eval/click", "/work/data/eval/flask",
                                                   "/work/data/eval/requests"])
    ap.add_argument("--distractors-from", nargs="+", default=[str(SITE / p) for p in DISTRACTOR_PACKAGES])
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER[-1]) if DEFAULT_TOKENIZER else None)
    ap.add_argument("--vocab", type=int, default=8192, help="kept token ids (incl. <unk>)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mem-layer", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128, help="T: window, chunk and training row length")
    ap.add_argument("--batch", type=int, default=16, help="rows per step (packs of 2)")
    ap.add_argument("--d", type=int, default=8, help="crossbatch range of the d>1 model")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--base-minutes", type=float, default=28.0)
    ap.add_argument("--max-base-steps", type=int, default=100_000)
    ap.add_argument("--ft-minutes", type=float, default=11.0, help="per fine-tune arm (steps from base rate)")
    ap.add_argument("--ft-steps", type=int, default=None, help="override --ft-minutes")
    ap.add_argument("--eval-windows", type=int, default=240)
    ap.add_argument("--distractors", default="8,64")
    ap.add_argument("--draws", type=int, default=2, help="independent distractor draws")
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--no-eval-base", dest="eval_base", action="store_false",
                    help="skip the extra table row of the shared base (the arms' common starting point)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="reuse finished phases and checkpoints in --work")
    ap.add_argument("--smoke", action="store_true", help="tiny settings to check the pipeline (~3 min)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.work = args.work.with_name(args.work.name + "-smoke")
        args.json = args.json.with_name("distraction-smoke.json")
        args.md = args.md.with_name("distraction-smoke.md")
        args.vocab, args.layers, args.hidden, args.intermediate = 2048, 2, 64, 128
        args.mem_layer, args.base_minutes, args.ft_steps = 1, 0.3, 3
        args.eval_windows, args.distractors, args.draws = 8, "2,4", 1
    args.distractors = [int(x) for x in str(args.distractors).split(",")]
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine_facts(args) -> dict:
    facts = {"nproc": os.cpu_count(), "cpu_model": cpu_model(), "torch": torch.__version__,
             "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
             "device": args.device, "nice": os.nice(0), "loadavg_start": list(os.getloadavg())}
    if args.device.startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


# ---------------------------------------------------------------------------------------------
# Setup: tokenizer, model, data


def build_tokenizer(args):
    from finetune.config import DataArgs
    from finetune.data import collect_files
    from finetune.distraction import RemappedTokenizer, count_tokens
    from longllama_lsp.model.loading import load_tokenizer

    base = load_tokenizer(args.tokenizer)
    cache = args.work / "vocab.json"
    if cache.is_file():
        keep = json.loads(cache.read_text())["keep"]
        if len(keep) == args.vocab - 1:
            return RemappedTokenizer(base, keep)
    t0 = time.perf_counter()
    files = collect_files(DataArgs(sources=args.train, languages=[".py"]))
    counts = count_tokens(base, (f.read_text() for f in files))
    tok = RemappedTokenizer.from_counts(base, counts, args.vocab)
    total = sum(counts.values())
    cov = sum(counts[i] for i in tok.keep) / max(total, 1)
    args.work.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"keep": tok.keep, "train_tokens": total, "train_coverage": cov}))
    log(f"vocab: {len(tok)} of {len(base)} ids cover {cov:.4f} of {total} training tokens "
        f"({time.perf_counter() - t0:.0f} s)")
    return tok


def build_model(args, tok):
    from longllama_lsp.model import LongLlamaConfig, LongLlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LongLlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.heads, head_dim=args.hidden // args.heads,
                          max_position_embeddings=args.seq_len, last_context_length=args.seq_len,
                          mem_layers=[args.mem_layer], mem_dtype="float32", tie_word_embeddings=True,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, unk_token_id=tok.unk_token_id)
    return LongLlamaForCausalLM(cfg).train()


def run_config(args, out_dir: Path, steps: int, d_schedule, max_minutes=None, resume=None):
    from finetune.config import DataArgs, ModelArgs, RunConfig, TrainArgs

    data = DataArgs(sources=list(args.train), languages=[".py"], min_doc_tokens=1024, seq_len=args.seq_len,
                    batch_size=args.batch, pack=2, cross_batch_range=1, stepping=True, d_schedule=d_schedule,
                    seed=args.seed)
    train = TrainArgs(out_dir=str(out_dir), steps=steps, max_minutes=max_minutes, lr=args.lr,
                      warmup_steps=args.warmup, weight_decay=0.01, max_grad_norm=1.0, seed=args.seed,
                      log_every=5, eval_batches=0, heldout_fraction=0.0, save_every=20, keep_checkpoints=1,
                      resume=resume, output="none", progress=False, cpu=not args.device.startswith("cuda"))
    return RunConfig(model=ModelArgs(train="all"), data=data, train=train)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def train_phase(args, tok, name: str, steps: int, d_schedule, max_minutes=None, start_from: Path | None = None):
    """Train (or resume) one phase; returns its done record. Writes work/name/done.json + model.pt."""
    from finetune.data import fot_batches
    from finetune.train import train_loop

    run_dir = args.work / name
    done_file = run_dir / "done.json"
    if args.resume and done_file.is_file():
        log(f"{name}: already done, reusing")
        return json.loads(done_file.read_text())
    own = latest_checkpoint(run_dir) if args.resume else None
    resume = str(own) if own is not None else (str(start_from) if start_from is not None else None)
    if not args.resume and run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = run_config(args, run_dir, steps, d_schedule, max_minutes, resume)
    log(f"{name}: train to step {steps} (max {max_minutes} min), d_schedule {d_schedule}, resume from {resume}")
    model = build_model(args, tok)
    t0 = time.perf_counter()
    result = train_loop(model, lambda: fot_batches(cfg.data, tok), cfg)
    wall = time.perf_counter() - t0
    ckpt = latest_checkpoint(run_dir)
    torch.save(result.model.state_dict(), run_dir / "model.pt")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first = int(Path(resume).name.split("-")[1]) if resume else 0
    these = [m for m in metrics if "loss" in m and m["step"] > first]
    rec = {"name": name, "step": result.step, "stopped": result.stopped, "tokens": result.tokens,
           "elapsed_s": round(result.elapsed_s, 1), "wall_s_this_call": round(wall, 1),
           "checkpoint": str(ckpt), "d_schedule": d_schedule, "started_at_step": first,
           "loss_first5": [m["loss"] for m in these[:5]] if these else [],
           "loss_last5_mean": (sum(m["loss"] for m in these[-5:]) / len(these[-5:])) if these else None}
    done_file.write_text(json.dumps(rec, indent=2) + "\n")
    log(f"{name}: done at step {rec['step']} ({rec['stopped']}), last-5 loss {rec['loss_last5_mean']}")
    return rec


# ---------------------------------------------------------------------------------------------
# Evaluation


def load_docs(roots, tok, min_tokens: int):
    """[(name, [bos]+tokens+[eos])] for every .py file of `roots` (walker rules) with >= min_tokens."""
    from finetune.config import DataArgs
    from finetune.data import collect_files, encode_document

    docs = []
    for root in roots:
        for f in collect_files(DataArgs(sources=[root], languages=[".py"], min_doc_tokens=0)):
            toks = encode_document(tok, f.read_text())[0]
            if len(toks) >= min_tokens:
                docs.append((f"{Path(root).name}/{f.path}", toks))
    return docs


def eval_setup(args, tok) -> dict:
    from finetune.distraction import chunk_windows, distractor_plan

    t = args.seq_len
    scored = load_docs(args.eval, tok, 2 * t)
    pool = load_docs(args.distractors_from, tok, t)
    windows = chunk_windows([d for _, d in scored], t)
    rng = random.Random(f"{args.seed}:windows")
    windows = sorted(rng.sample(windows, min(args.eval_windows, len(windows))))
    pool_chunk = [random.Random(f"{args.seed}:pool:{name}").randrange(len(toks) // t) for name, toks in pool]
    nmax = max(args.distractors)
    plans = [distractor_plan(len(windows), len(pool), nmax, seed=args.seed * 1000 + draw)
             for draw in range(args.draws)]
    unk = sum(sum(1 for x in d[c * t:(c + 1) * t] if x == tok.unk_token_id) for (i, c) in windows
              for d in [scored[i][1]])
    return {"scored": scored, "pool": pool, "windows": windows, "pool_chunk": pool_chunk, "plans": plans,
            "unk_fraction": unk / max(len(windows) * t, 1)}


@torch.no_grad()
def evaluate_model(args, model, setup, out_file: Path) -> dict:
    """Per-window summed NLL under every condition; resumable per condition through out_file."""
    from finetune.distraction import stack_rows, window_nll
    from longllama_lsp.model import Memory

    t = args.seq_len
    model.eval()
    scored, pool, windows = setup["scored"], setup["pool"], setup["windows"]
    res = json.loads(out_file.read_text()) if (args.resume and out_file.is_file()) else {}
    ids = torch.tensor([scored[i][1][c * t:(c + 1) * t] for i, c in windows])  # (W, T)
    prev = torch.tensor([scored[i][1][(c - 1) * t:c * t] for i, c in windows])

    def encode(rows: torch.Tensor) -> list:
        out = []
        for b in range(0, len(rows), 32):
            mem = model.encode_memory(rows[b:b + 32].to(model.device))
            out += mem.split_rows()
        return out

    t0 = time.perf_counter()
    own = encode(prev)
    pool_ids = [toks[k * t:(k + 1) * t] for (_, toks), k in zip(pool, setup["pool_chunk"], strict=True)]
    pool_rows = encode(torch.tensor(pool_ids))
    log(f"  encoded {len(own)} own + {len(pool_rows)} distractor chunks ({time.perf_counter() - t0:.0f} s)")
    conditions = [("none", None, None), ("own+0", 0, 0)]
    conditions += [(f"own+{n}" + (f"/draw{dr}" if dr else ""), n, dr) for dr in range(args.draws)
                   for n in args.distractors]
    for name, n, draw in conditions:
        if name in res:
            continue
        t0 = time.perf_counter()
        nll = []
        for b in range(0, len(windows), args.eval_batch):
            idx = range(b, min(b + args.eval_batch, len(windows)))
            if n is None:
                mem = None
            else:
                mem = stack_rows([Memory.concat([own[w]] + [pool_rows[p] for p in setup["plans"][draw][w][:n]])
                                  for w in idx])
            nll += window_nll(model, ids[list(idx)], mem).tolist()
        res[name] = nll
        out_file.write_text(json.dumps(res))
        tokens = len(windows) * (t - 1)
        log(f"  {name:14s} ppl {math.exp(sum(nll) / tokens):8.3f}  ({time.perf_counter() - t0:.0f} s)")
    return res


def ppl(nll, idx, t) -> float:
    return math.exp(sum(nll[i] for i in idx) / (len(idx) * (t - 1)))


def summarize(args, setup, evals: dict, names: list[str], extra: tuple[str, ...] = ()) -> dict:
    t = args.seq_len
    w = setup["windows"]
    all_idx = list(range(len(w)))
    halves = {"A": all_idx[0::2], "B": all_idx[1::2]}
    conds = ["none", "own+0"] + [f"own+{n}" for n in args.distractors]
    nmax = f"own+{max(args.distractors)}"
    table = {}
    for m in [*names, *extra]:
        ev = evals[m]
        row = {c: ppl(ev[c], all_idx, t) for c in conds}
        row["degradation_own0_to_max"] = row[nmax] / row["own+0"] - 1
        for dr in range(1, args.draws):
            for n in args.distractors:
                row[f"own+{n}/draw{dr}"] = ppl(ev[f"own+{n}/draw{dr}"], all_idx, t)
            row[f"degradation/draw{dr}"] = row[f"{nmax}/draw{dr}"] / row["own+0"] - 1
        for h, idx in halves.items():
            row[f"degradation/half{h}"] = ppl(ev[nmax], idx, t) / ppl(ev["own+0"], idx, t) - 1
            row[f"own_gain/half{h}"] = 1 - ppl(ev["own+0"], idx, t) / ppl(ev["none"], idx, t)
        row["own_gain"] = 1 - row["own+0"] / row["none"]
        row["max_vs_none"] = row[nmax] / row["none"] - 1
        table[m] = row
    # Paired cluster bootstrap over scored files: degradation(d=1) - degradation(d>1).
    files = sorted({i for i, _ in w})
    by_file = {f: [k for k, (i, _) in enumerate(w) if i == f] for f in files}
    rng = random.Random(12345)
    a, b = names
    diffs = []
    for _ in range(2000):
        idx = [k for f in rng.choices(files, k=len(files)) for k in by_file[f]]
        da = ppl(evals[a][nmax], idx, t) / ppl(evals[a]["own+0"], idx, t) - 1
        db = ppl(evals[b][nmax], idx, t) / ppl(evals[b]["own+0"], idx, t) - 1
        diffs.append(da - db)
    diffs.sort()
    point = table[a]["degradation_own0_to_max"] - table[b]["degradation_own0_to_max"]
    boot = {"diff_degradation_d1_minus_dD": point, "ci95": [diffs[int(0.025 * len(diffs))],
                                                             diffs[int(0.975 * len(diffs)) - 1]],
            "p_d1_not_worse": sum(1 for x in diffs if x <= 0) / len(diffs), "files": len(files),
            "resamples": len(diffs)}
    return {"table": table, "bootstrap": boot, "conditions": conds}


# ---------------------------------------------------------------------------------------------
# Report


def fmt_pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def markdown(args, res: dict) -> str:
    s, tr, f = res["summary"], res["training"], res["machine"]
    names = res["models"]
    rows_md = [*names, *res.get("extra_models", [])]
    conds = s["conditions"]
    nmax = conds[-1]
    head = "| model | " + " | ".join(conds) + f" | own+0 → {nmax} |"
    lines = [head, "|" + "---|" * (len(conds) + 2)]
    for m in rows_md:
        row = s["table"][m]
        lines.append(f"| {m} | " + " | ".join(f"{row[c]:.3f}" for c in conds)
                     + f" | {fmt_pct(row['degradation_own0_to_max'])} |")
    noise = ["| model | own gain (none → own+0) | degr. half A | degr. half B"
             + "".join(f" | degr. draw {d}" for d in range(1, args.draws)) + " |",
             "|---|---|---|---|" + "---|" * (args.draws - 1)]
    ta, td = s["table"][names[0]], s["table"][names[1]]
    weak = max(ta["own_gain"], td["own_gain"]) < 0.02
    worse_than_none = [m for m in names if s["table"][m][conds[2]] > s["table"][m]["none"]]
    caveats = []
    if weak:
        caveats.append(f"Memory use is weak at this scale: the own previous chunk lowers perplexity by only "
                       f"{100 * ta['own_gain']:.1f}% (d=1) and {100 * td['own_gain']:.1f}% (d={args.d}).")
    if worse_than_none:
        caveats.append(f"With {conds[2].removeprefix('own+')} or more distractors "
                       f"{' and '.join(worse_than_none)} {'are' if len(worse_than_none) > 1 else 'is'} worse "
                       f"than with no memory at all ({nmax} vs none: d=1 {fmt_pct(ta['max_vs_none'])}, "
                       f"d={args.d} {fmt_pct(td['max_vs_none'])}).")
    if all(td[c] > ta[c] for c in conds):
        caveats.append(f"The d={args.d} model has the higher perplexity in every condition (none "
                       f"{td['none']:.2f} vs {ta['none']:.2f}, {nmax} {td[nmax]:.2f} vs {ta[nmax]:.2f}), so part "
                       f"of its smaller relative degradation is smaller reliance on memory (its own gain is "
                       f"smaller too), not better use of it; in absolute terms it is not better at {nmax}.")
    caveats.append("The halves and the second distractor draw agree closely, and the interval covers the "
                   "choice of files; it does not cover training noise (one training run per arm: a different "
                   "seed or data order could move the arms by a similar amount as their gap at 'none').")
    for m in rows_md:
        row = s["table"][m]
        noise.append(f"| {m} | {fmt_pct(-row['own_gain'])} | {fmt_pct(row['degradation/halfA'])} | "
                     f"{fmt_pct(row['degradation/halfB'])}"
                     + "".join(f" | {fmt_pct(row[f'degradation/draw{d}'])}" for d in range(1, args.draws)) + " |")
    b = s["bootstrap"]
    a_name, d_name = names
    da, dd = s["table"][a_name]["degradation_own0_to_max"], s["table"][d_name]["degradation_own0_to_max"]
    gain_a, gain_d = s["table"][a_name]["own_gain"], s["table"][d_name]["own_gain"]
    lo, hi = b["ci95"]
    if gain_a <= 0.002 and gain_d <= 0.002:
        verdict = ("Neither model gains from its own previous chunk (own+0 is not better than none), so the "
                   "models did not learn to use memory in this budget and the distraction comparison says "
                   "nothing about FoT.")
    elif lo > 0:
        verdict = (f"In the paper's direction: the d={args.d} model degrades less ({fmt_pct(dd)} vs {fmt_pct(da)} from own+0 to "
                   f"{nmax}); the difference, {100 * b['diff_degradation_d1_minus_dD']:.1f} percentage points, "
                   f"has a 95% file-bootstrap interval [{100 * lo:.1f}, {100 * hi:.1f}] that excludes 0.")
    elif hi < 0:
        verdict = (f"No, the opposite: the d=1 model degrades less ({fmt_pct(da)} vs {fmt_pct(dd)}), 95% "
                   f"file-bootstrap interval of the difference [{100 * lo:.1f}, {100 * hi:.1f}] points.")
    else:
        verdict = (f"Not resolved: degradation own+0 → {nmax} is {fmt_pct(da)} (d=1) vs {fmt_pct(dd)} "
                   f"(d={args.d}); the difference, {100 * b['diff_degradation_d1_minus_dD']:.1f} points, has a "
                   f"95% file-bootstrap interval [{100 * lo:.1f}, {100 * hi:.1f}] that includes 0.")
    base = tr["base"]
    arms = [tr[m] for m in names]
    md = f"""## Distraction: crossbatch d=1 vs d={args.d} (issue #5)

Small LongLLaMA models trained from random init with the repo's FoT crossbatch loop, evaluated
on held-out packages with memory = the document's own previous chunk plus 0 / 8 / 64 chunks of
other documents. Perplexity per token of {len(res['windows'])} held-out windows of {args.seq_len}
tokens ({res['scored_files']} files of {', '.join(Path(p).name for p in args.eval)}); distractors
from {', '.join(Path(p).name for p in args.distractors_from)} ({res['pool_docs']} files, one chunk each).

{chr(10).join(lines)}

Noise checks (degradation own+0 → {nmax}; own gain = perplexity change from none to own+0):

{chr(10).join(noise)}

Paired file-cluster bootstrap ({b['resamples']} resamples over {b['files']} files) of
degradation(d=1) − degradation(d={args.d}): {100 * b['diff_degradation_d1_minus_dD']:+.1f} points,
95% interval [{100 * lo:+.1f}, {100 * hi:+.1f}].

**Conclusion.** {verdict}

{chr(10).join("- " + c for c in caveats)}

Setup: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, MLP {args.intermediate},
memory layer {args.mem_layer} (RoPE, memory keys at position 0), window/chunk {args.seq_len} tokens,
{res['params_m']:.1f}M parameters; SmolLM2 tokenizer restricted to its {args.vocab} most frequent ids
on the training code (training coverage {res['vocab_train_coverage']:.3f}, <unk> share of scored
tokens {res['unk_fraction']:.3f}). Training data {', '.join(Path(p).name for p in args.train)}
(directory documents, min 1024 tokens), rows of {args.seq_len}, batch {args.batch} rows = {args.batch // 2}
packs of 2, AdamW lr {args.lr} (warmup {args.warmup}, then constant), wd 0.01, clip 1.0, seed {args.seed}.
Row "base": the shared starting point of both arms, evaluated the same way.
Shared base: positives only (range 1) for {base['step']} steps ({base['tokens']:,} tokens,
{base['elapsed_s'] / 60:.1f} min, last-5 train loss {base['loss_last5_mean']:.3f}). Then
{arms[0]['step'] - base['step']} more steps each (same data, optimizer state, seed):
d=1 (range 1; last-5 train loss {arms[0]['loss_last5_mean']:.3f}) and d={args.d}
(range {args.d}; last-5 train loss {arms[1]['loss_last5_mean']:.3f}; train losses of the two arms are
not comparable: negatives change what is predicted from).

Command: `{res['command']}`{" (finished by a second call with `--resume`, which reuses done phases)" if res.get("resumed") else ""}
Date: {res['date']}. Machine: {f['nproc']} × {f['cpu_model']}, torch {f['torch']}, {f['torch_threads']}
thread(s), nice {f['nice']}, device {f['device']}, load average at start {f['loadavg_start'][0]:.1f}
(other workers share the cores). Wall time {res['wall_s'] / 60:.1f} min.
"""
    return md


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    facts = machine_facts(args)
    log(f"machine: {facts}")
    args.work.mkdir(parents=True, exist_ok=True)
    from finetune.train import make_accelerator  # noqa: F401  (import errors early)

    tok = build_tokenizer(args)
    vocab_info = json.loads((args.work / "vocab.json").read_text())
    params = sum(p.numel() for p in build_model(args, tok).parameters()) / 1e6
    log(f"model: {params:.2f}M parameters, vocab {len(tok)}")

    base = train_phase(args, tok, "base", args.max_base_steps, [], max_minutes=args.base_minutes)
    s = base["step"]
    if args.ft_steps is not None:
        ft = args.ft_steps
    else:
        ft = max(1, round(args.ft_minutes * 60 / (base["elapsed_s"] / max(s, 1))))
    base_ckpt = Path(base["checkpoint"])
    names = ["d=1", f"d={args.d}"]
    training = {"base": base}
    training["d=1"] = train_phase(args, tok, "d1", s + ft, [], start_from=base_ckpt)
    training[f"d={args.d}"] = train_phase(args, tok, f"d{args.d}", s + ft, [(s, args.d)], start_from=base_ckpt)

    log("evaluation setup")
    setup = eval_setup(args, tok)
    log(f"{len(setup['windows'])} windows from {len({i for i, _ in setup['windows']})} files; "
        f"pool {len(setup['pool'])} distractor files; unk {setup['unk_fraction']:.3f}")
    evals = {}
    for m, d in zip(names, ["d1", f"d{args.d}"], strict=True):
        log(f"evaluate {m}")
        model = build_model(args, tok)
        model.load_state_dict(torch.load(args.work / d / "model.pt", map_location="cpu"))
        model.to(args.device)
        evals[m] = evaluate_model(args, model, setup, args.work / f"eval-{d}.json")

    extra = ()
    if args.eval_base:
        log("evaluate base")
        model = build_model(args, tok)
        model.load_state_dict(torch.load(args.work / "base" / "model.pt", map_location="cpu"))
        model.to(args.device)
        evals["base"] = evaluate_model(args, model, setup, args.work / "eval-base.json")
        extra = ("base",)
    summary = summarize(args, setup, evals, names, extra)
    facts["loadavg_end"] = list(os.getloadavg())
    res = {"issue": 5, "models": names, "extra_models": list(extra), "summary": summary, "training": training, "machine": facts,
           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "windows": setup["windows"], "scored_files": len({i for i, _ in setup["windows"]}),
           "pool_docs": len(setup["pool"]), "unk_fraction": setup["unk_fraction"], "params_m": params,
           "vocab_train_coverage": vocab_info["train_coverage"],
           "command": "nice -n 15 python bench/bench_distraction.py " + " ".join(shlex.quote(a) for a in
                                                                                   (argv or sys.argv[1:]) if a != "--resume"),
           "resumed": bool(args.resume),
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "wall_s": time.perf_counter() - wall0,
           "per_window_nll": evals}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(args, res)
    args.md.write_text(md)
    print(md)
    for m in [*names, *extra]:
        row = summary["table"][m]
        print(m, {c: round(row[c], 3) for c in summary["conditions"]},
              "degradation", fmt_pct(row["degradation_own0_to_max"]))
    print("facts", json.dumps(facts))
    print(f"wall {res['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
