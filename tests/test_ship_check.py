"""bench/ship_check.py: the rule a trained memory delta passes before it replaces the shipped one,
replayed on the real 60-hole results (run 2's delta, withdrawn, against the issue-6 default)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import ship_check  # noqa: E402

RESULTS = BENCH / "results"
DEFAULT = RESULTS / "crossfile-60-default-sparse-dense.json"  # the issue-6 delta, shipped
RUN2 = RESULTS / "crossfile-60-sparse-dense.json"  # run 2's delta, withdrawn on these numbers


def guard(tmp_path: Path, name: str, perplexity: float) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"model": name, "guard": {"perplexity": perplexity, "tokens": 14049}}))
    return str(path)


def test_run_2_would_have_been_kept_out(tmp_path, capsys):
    """Perplexity without memory -3.5% passes; completions with memory worse fail: keep (exit 1)."""
    code = ship_check.main(["--guard", guard(tmp_path, "default", 7.7959), guard(tmp_path, "run2", 7.5211),
                            "--crossfile", f"{DEFAULT}:c", f"{RUN2}:c"])
    out = capsys.readouterr().out
    assert code == 1 and "keep the current delta" in out
    assert "ok   perplexity without memory 7.7959 -> 7.5211 (-3.5%" in out
    assert "FAIL edit similarity with memory, 60 holes: 0.374 -> 0.350" in out


def test_a_candidate_as_good_with_memory_and_within_the_guard_ships(tmp_path, capsys):
    code = ship_check.main(["--guard", guard(tmp_path, "a", 7.7959), guard(tmp_path, "b", 7.85),
                            "--crossfile", f"{DEFAULT}:c", f"{DEFAULT}:c"])
    assert code == 0 and "ship the candidate" in capsys.readouterr().out
    code = ship_check.main(["--guard", guard(tmp_path, "a", 7.7959), guard(tmp_path, "b", 7.90),  # +1.3%
                            "--crossfile", f"{DEFAULT}:c", f"{DEFAULT}:c"])
    assert code == 1 and "FAIL perplexity" in capsys.readouterr().out


def test_inputs_that_cannot_decide_exit_2(tmp_path, capsys):
    partial = json.loads(DEFAULT.read_text())
    partial["summary"]["c/all"]["n"] = 20  # a --per-repo smoke run
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    g = [guard(tmp_path, "a", 7.7959), guard(tmp_path, "b", 7.7)]
    assert ship_check.main(["--guard", *g, "--crossfile", f"{DEFAULT}:c", f"{tmp_path / 'partial.json'}:c"]) == 2
    assert "the rule needs all 60" in capsys.readouterr().err
    assert ship_check.main(["--guard", *g, "--crossfile", f"{DEFAULT}:c", f"{DEFAULT}:d"]) == 2
    assert ship_check.main(["--guard", *g, "--crossfile", str(DEFAULT), f"{DEFAULT}:c"]) == 2
    assert ship_check.main(["--guard", g[0], str(DEFAULT), "--crossfile", f"{DEFAULT}:c", f"{DEFAULT}:c"]) == 2
