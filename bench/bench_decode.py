"""CPU decode step: float32 weights vs the bfloat16 decode copies (model/decode_weights.py), and what
each costs in quality. int8 dynamic quantization (torch.ao) is measured too, as the option we turned down.

    python bench/bench_decode.py [--file PATH] [--steps 200] [--repeats 3] [--json out.json]

The default model (SmolLM2-135M as LongLLaMA, with its FoT memory delta) on the CPU. Speed: the
median time of one-token steps after a 900-token prefix (random tokens: the step's cost does not
depend on them); the variants alternate `--repeats` times in one process, so machine noise hits each.
Quality: teacher-forced decoding of a real file (each step feeds the true next token through the
cache, the way completions decode): agreement of each variant's greedy choice with float32's, and
perplexity.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from facts import cpu_model
from torch import nn

from longllama_lsp.load import load_model_and_tokenizer
from longllama_lsp.model.decode_weights import DecodeLinear, add_decode_weights

DEFAULT_FILE = Path("/work/data/eval/requests/requests/sessions.py")  # requests 2.32.3


def machine_facts() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": cpu_model(), "cores": os.cpu_count(), "load_avg": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M")}


@torch.inference_mode()
def step_ms(model, prefix: int = 900, steps: int = 30) -> float:
    """Median ms of a one-token step with `prefix` cached tokens."""
    ids = torch.randint(0, model.config.vocab_size, (1, prefix))
    cache = model(ids, use_cache=True, last_context_length=model.window, logits_to_keep=1).past_key_values
    token, times = torch.tensor([[5]]), []
    for _ in range(steps):
        t0 = time.perf_counter()
        cache = model(token, past_key_values=cache, use_cache=True, last_context_length=model.window,
                      logits_to_keep=1).past_key_values
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def teacher_forced(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """(N, V) logits predicting ids[prompt:], one cached step per token after a `prompt`-token prefill."""
    out = model(ids[:, :prompt], use_cache=True, last_context_length=model.window, logits_to_keep=1)
    rows, cache = [out.logits[0, -1]], out.past_key_values
    for i in range(prompt, ids.shape[1] - 1):
        out = model(ids[:, i:i + 1], past_key_values=cache, use_cache=True, last_context_length=model.window,
                    logits_to_keep=1)
        rows.append(out.logits[0, -1])
        cache = out.past_key_values
    return torch.stack(rows).float()


def set_decode_copies(model, on: bool) -> None:
    """Switch the bfloat16 copies on or off without a second model (their forward checks the rows)."""
    for m in model.modules():
        if "decode_weight" in m._buffers:
            m.__class__ = DecodeLinear if on else nn.Linear


def int8_dynamic(model):
    from torch.ao.quantization import quantize_dynamic

    set_decode_copies(model, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", type=Path, default=DEFAULT_FILE, help="real code for the quality figures")
    ap.add_argument("--skip", type=int, default=2000, help="tokens of the file skipped first")
    ap.add_argument("--prompt", type=int, default=500, help="tokens prefilled before teacher forcing")
    ap.add_argument("--steps", type=int, default=200, help="teacher-forced steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    model, tokenizer, path = load_model_and_tokenizer(device="cpu", dtype="float32", decode_dtype="float32")
    add_decode_weights(model, torch.bfloat16)
    q8 = int8_dynamic(model)
    facts = machine_facts()
    print(json.dumps(facts))

    variants = {"float32": (model, False), "bfloat16 decode copies": (model, True), "int8 dynamic": (q8, False)}
    speed: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (m, copies) in variants.items():
            set_decode_copies(model, copies)
            speed[name].append(step_ms(m))

    ids = tokenizer(args.file.read_text(encoding="utf-8"), return_tensors="pt")["input_ids"]
    ids = ids[:, args.skip:args.skip + args.prompt + args.steps]  # (1, prompt + steps)
    target = ids[0, args.prompt:]
    rows = []
    base = None
    for name, (m, copies) in variants.items():
        set_decode_copies(model, copies)
        logits = teacher_forced(m, ids, args.prompt)
        base = logits if base is None else base
        rows.append({"variant": name, "decode_ms": statistics.median(speed[name]), "runs_ms": speed[name],
                     "agreement": float((logits.argmax(-1) == base.argmax(-1)).float().mean()),
                     "perplexity": float(nn.functional.cross_entropy(logits, target).exp())})
    ref = rows[0]["decode_ms"]
    print(f"\n{len(target)} teacher-forced steps of {args.file} after {args.prompt} tokens; "
          f"decode step with 900 cached tokens, median of {args.repeats} x 30\n")
    print("| weights for decode steps | ms/token | vs float32 | greedy agreement with float32 | perplexity |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['decode_ms']:.1f} | {ref / r['decode_ms']:.2f}x | {r['agreement']:.1%} "
              f"| {r['perplexity']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": facts, "model": str(path), "file": str(args.file),
                                         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
