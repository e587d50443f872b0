"""Our model on CUDA equals our model on CPU (fp32), and bf16 on CUDA stays close.

    python bench/gpu_check.py [--model tests/fixtures/recall-tiny]

Checks, on a checkpoint small enough to run anywhere:
  - a multi-window forward (memory filled from earlier windows): CUDA fp32 logits vs CPU fp32;
  - encode_memory + a forward over that memory;
  - greedy generate with the local cache overflowing into memory: same tokens;
  - one crossbatch training step: loss and the memory layers' gradients, CUDA vs CPU.
Prints the maximum differences and exits 1 when one exceeds its tolerance. No GPU: exits 0 saying so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "recall-tiny"))
    p.add_argument("--tol", type=float, default=2e-4)
    p.add_argument("--device", default="cuda", help="the device compared with CPU (cpu: a self-test of this script)")
    args = p.parse_args()
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    from longllama_lsp.model.crossbatch import CrossBatch
    from longllama_lsp.model.loading import load_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = load_model(args.model, "cpu", torch.float32).eval()
    gpu = load_model(args.model, dev, torch.float32).eval()
    window = cpu.config.max_position_embeddings
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cpu.config.vocab_size, (2, 3 * window + 7), generator=g)  # (B, T): several windows
    failures = []

    def check(name: str, a: torch.Tensor, b: torch.Tensor, tol: float = args.tol) -> None:
        diff = (a.float().cpu() - b.float().cpu()).abs().max().item()
        ok = diff <= tol
        print(f"{name:40s} max |diff| {diff:.3e} {'ok' if ok else 'FAIL'} (tol {tol:g})")
        if not ok:
            failures.append(name)

    with torch.no_grad():
        check("forward, windows + memory (fp32)", cpu(ids).logits, gpu(ids.to(dev)).logits)
        mem_c, mem_g = cpu.encode_memory(ids[:, :window]), gpu.encode_memory(ids[:, :window].to(dev))
        q = ids[:, window: window + 16]
        check("forward over encoded memory (fp32)", cpu(q, memory=mem_c).logits, gpu(q.to(dev), memory=mem_g).logits)
        seq_c = cpu.generate(ids[:, : window + 5], max_new_tokens=window // 2)
        seq_g = gpu.generate(ids[:, : window + 5].to(dev), max_new_tokens=window // 2)
        same = torch.equal(seq_c, seq_g.cpu())
        print(f"{'greedy generate, cache overflow':40s} {'same tokens' if same else 'DIFFERENT tokens'}")
        if not same:
            failures.append("generate")
        bf = load_model(args.model, dev, torch.bfloat16).eval()
        lb, lf = bf(ids.to(dev)).logits.float(), gpu(ids.to(dev)).logits
        agree = (lb.argmax(-1) == lf.argmax(-1)).float().mean().item()
        print(f"{'forward bf16 vs fp32 (information)':40s} max |diff| {(lb - lf).abs().max().item():.3e}, "
              f"top-1 agreement {agree:.1%}")

    cb = CrossBatch(range=3, pack=2)
    rows = torch.randint(3, cpu.config.vocab_size, (4, window), generator=g)  # (B, T) crossbatch rows
    grads = []
    for model, x in ((cpu, rows), (gpu, rows.to(dev))):
        model.train()
        model.zero_grad()
        out = model(x, labels=x, crossbatch=cb)
        out.loss.backward()
        layer = model.model.layers[model.config.mem_layers[0]].self_attn
        grads.append((out.loss.detach(), layer.k_proj.weight.grad.detach(), layer.v_proj.weight.grad.detach()))
    check("crossbatch loss", grads[0][0], grads[1][0])
    check("crossbatch grad k_proj (memory layer)", grads[0][1], grads[1][1], tol=args.tol * 10)
    check("crossbatch grad v_proj (memory layer)", grads[0][2], grads[1][2], tol=args.tol * 10)

    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(5):
            gpu(ids.to(dev))
    sync()
    print(f"timing: {(time.perf_counter() - t0) / 5 * 1000:.1f} ms per {ids.numel()}-token forward on "
          f"{torch.cuda.get_device_name(0) if dev.startswith('cuda') else dev}")
    print("FAILED: " + ", ".join(failures) if failures else "all CUDA checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
