"""Each convertible model family at a small size, and the default model: convert, parity, speed.

    python bench/bench_families.py [--json out.json] [--skip-default]

Per family (seeded random weights, transformers' own classes, 8 layers, hidden 256, vocab 4096):
`longllama convert` time, max |logits - transformers'| on 512 tokens without memory layers (fp32),
forward time ours vs transformers (alternating, median of 5: the ratio is the figure), and greedy
`model.generate` speed with 2048 tokens of repository memory in the default memory layers.
The default model (bundled SmolLM2-135M, FoT delta applied) gets the same generate figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf
from facts import cpu_model

from longllama_lsp.convert import convert
from longllama_lsp.model.loading import load_model

SIZE = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False)
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "llama-3.1 rope (llama3)": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=256))),
    "deepseek-coder rope (linear)": (tf.LlamaConfig, tf.LlamaForCausalLM,
                                     dict(rope_parameters=dict(rope_type="linear", rope_theta=1e5, factor=4.0))),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=None)),
    "qwen2 (tied)": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "starcoder2": (tf.Starcoder2Config, tf.Starcoder2ForCausalLM, dict(sliding_window=None)),
}


def median_ms(fn, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


@torch.no_grad()
def generate_tokens_per_s(model, memory_tokens: int = 2048, new: int = 32) -> float:
    g = torch.Generator().manual_seed(0)
    memory = model.encode_memory(torch.randint(3, model.config.vocab_size, (1, memory_tokens), generator=g))
    prompt = torch.randint(3, model.config.vocab_size, (1, 256), generator=g)
    t0 = time.perf_counter()
    out = model.generate(prompt, memory=memory, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=0)
    return (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - t0)


@torch.no_grad()
def family_row(name: str, work: Path) -> dict:
    config_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(0)
    theirs = model_cls(config_cls(**{**SIZE, **extra})).eval()
    src = work / name.split()[0]
    theirs.save_pretrained(src)
    t0 = time.perf_counter()
    plain = load_model(convert(src, work / f"{src.name}-plain", mem_layers=[], window=1024))
    convert_s = time.perf_counter() - t0
    ids = torch.randint(3, SIZE["vocab_size"], (1, 512), generator=torch.Generator().manual_seed(1))
    diff = (plain(ids, last_context_length=1024).logits - theirs(ids).logits).abs().max().item()
    ours_ms, theirs_ms = [], []
    for _ in range(5):  # alternate, so machine noise hits both
        ours_ms.append(median_ms(lambda: plain(ids, last_context_length=1024), reps=1))
        theirs_ms.append(median_ms(lambda: theirs(ids), reps=1))
    with_memory = load_model(convert(src, work / f"{src.name}-mem", window=1024))
    return {"family": name, "convert_s": round(convert_s, 2), "max_abs_logit_diff": diff,
            "forward_512_ms_ours": round(statistics.median(ours_ms), 1),
            "forward_512_ms_transformers": round(statistics.median(theirs_ms), 1),
            "mem_layers": with_memory.config.mem_layers,
            "generate_tok_s_2048_memory": round(generate_tokens_per_s(with_memory), 1)}


def default_row() -> dict:
    from longllama_lsp.model.loading import memory_training
    from longllama_lsp.resolve import resolve_model

    t0 = time.perf_counter()
    path = resolve_model()
    resolve_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = load_model(path)
    load_s = time.perf_counter() - t0
    return {"family": "default: SmolLM2-135M-Instruct (bundled)", "resolve_s": round(resolve_s, 2),
            "load_s": round(load_s, 2), "memory_training": memory_training(path), "mem_layers": model.config.mem_layers,
            "generate_tok_s_2048_memory": round(generate_tokens_per_s(model), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--skip-default", action="store_true", help="only the small family models")
    args = parser.parse_args()
    import os

    facts = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
             "transformers": tf.__version__, "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(facts))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in FAMILIES:
            rows.append(family_row(name, Path(work)))
            print(json.dumps(rows[-1]), flush=True)
    if not args.skip_default:
        rows.append(default_row())
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
