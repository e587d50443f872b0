"""bench/compact_delta.py: a merged LoRA run's delta stacked back into pairs (how stage 4 shipped)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import compact_delta as C  # noqa: E402


def _files(tmp_path: Path, change_rank: int) -> tuple[Path, Path, Path]:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(24, 20, generator=g), "r": torch.randn(4, 4, generator=g)}
    prev = {"w.lora_up": torch.randn(24, 3, generator=g) * 0.1, "w.lora_down": torch.randn(3, 20, generator=g)}
    change = torch.randn(24, change_rank, generator=g) @ torch.randn(change_rank, 20, generator=g) * 0.01
    merged = {"w": base["w"] + prev["w.lora_up"] @ prev["w.lora_down"] + change, "r": torch.randn(4, 4, generator=g)}
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    save_file(prev, tmp_path / "prev.safetensors")
    save_file(merged, tmp_path / "merged.safetensors")
    return tmp_path / "base", tmp_path / "prev.safetensors", tmp_path / "merged.safetensors"


def test_a_low_rank_change_is_stacked_beside_the_old_pair(tmp_path):
    base, prev, merged = _files(tmp_path, change_rank=2)
    out = tmp_path / "out.safetensors"
    assert C.main(["--base", str(base), "--previous", str(prev), "--merged", str(merged), "--rank", "2",
                   "--out", str(out)]) == 0
    got, m, b = load_file(out), load_file(merged), load_file(base / "model.safetensors")
    assert got["w.lora_up"].shape == (24, 5) and got["w.lora_down"].shape == (5, 20)  # 3 + 2
    assert torch.allclose(b["w"] + got["w.lora_up"] @ got["w.lora_down"], m["w"], atol=1e-5)
    assert torch.equal(got["r"], m["r"])  # a replacement stays one


def test_a_change_of_higher_rank_is_refused(tmp_path):
    base, prev, merged = _files(tmp_path, change_rank=6)
    out = tmp_path / "out.safetensors"
    assert C.main(["--base", str(base), "--previous", str(prev), "--merged", str(merged), "--rank", "2",
                   "--out", str(out)]) == 1
    assert not out.exists()


def test_a_runs_pairs_are_stacked_after_the_previous_delta(tmp_path):
    """--pairs: the run's delta already holds pairs applied after --previous (a replacement of the
    previous delta stays and gets the new pair on top; a pair of one name grows in rank)."""
    g = torch.Generator().manual_seed(1)
    prev = {"w.lora_up": torch.randn(24, 3, generator=g), "w.lora_down": torch.randn(3, 20, generator=g),
            "r": torch.randn(4, 4, generator=g)}
    run = {"w.lora_up": torch.randn(24, 2, generator=g), "w.lora_down": torch.randn(2, 20, generator=g),
           "r.lora_up": torch.randn(4, 1, generator=g), "r.lora_down": torch.randn(1, 4, generator=g)}
    save_file(prev, tmp_path / "prev.safetensors")
    save_file(run, tmp_path / "run.safetensors")
    out = tmp_path / "out.safetensors"
    assert C.main(["--previous", str(tmp_path / "prev.safetensors"), "--pairs", str(tmp_path / "run.safetensors"),
                   "--out", str(out)]) == 0
    got = load_file(out)
    assert got["w.lora_up"].shape == (24, 5)
    torch.testing.assert_close(got["w.lora_up"] @ got["w.lora_down"],
                               prev["w.lora_up"] @ prev["w.lora_down"] + run["w.lora_up"] @ run["w.lora_down"])
    assert torch.equal(got["r"], prev["r"]) and torch.equal(got["r.lora_up"], run["r.lora_up"])
