"""The cross-file completion benchmark's hole extraction, metrics and retrieval (bench/crossfile/).

Test Data: a four-file package written to tmp_path (a definition file, a user of it, a file that
shadows a repository name with typing's, an unrelated file); bench/crossfile/holes.jsonl checked
against the unpacked wheels in /work/data/eval when they are there (skipped otherwise).
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "crossfile"
sys.path.insert(0, str(BENCH))

import holes as H  # noqa: E402
from metrics import edit_similarity, score  # noqa: E402
from retrieval import SnippetIndex, build_header, fit_prefix  # noqa: E402

DATA = Path("/work/data/eval")

DEFS = '''"""Definitions."""

DEFAULT_LIMIT = 10


def compute_total(items):
    return sum(items)


class Widget:
    def render_widget(self):
        return "w"


class Tuple:
    pass
'''

USE = '''"""Uses the definitions."""
import typing as t

from .defs import DEFAULT_LIMIT, Widget, compute_total


def local_helper(x):
    return x + 1


def main(values):
    total = compute_total(values)
    w = Widget()
    shape = t.Tuple[int, int]
    text = w.render_widget()
    extra = local_helper(total)
    return extra if extra < DEFAULT_LIMIT else text
'''


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "defs.py").write_text(DEFS)
    (pkg / "use.py").write_text(USE)
    (pkg / "other.py").write_text("\n".join(f"value_{i} = {i}" for i in range(12)) + "\n")
    return tmp_path


def _line(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines()) if needle in ln)


def test_crossfile_holes_reference_names_defined_only_in_another_file(repo: Path):
    cross, ordinary = H.repo_holes("pkg", repo)
    by_line = {}
    for h in cross:
        assert h.path == "pkg/use.py"  # defs.py uses nothing from other files
        by_line.setdefault(h.line, []).append(h)
    assert set(by_line) == {_line(USE, "compute_total(values)"), _line(USE, "Widget()"),
                            _line(USE, "render_widget()"), _line(USE, "DEFAULT_LIMIT else")}
    total = {h.anchor: h for h in by_line[_line(USE, "compute_total(values)")]}
    assert total["indent"].expected == "total = compute_total(values)"
    assert total["identifier"].expected == "compute_total(values)"
    assert total["identifier"].xfile == [{"name": "compute_total", "defined_in": ["pkg/defs.py"]}]
    # typing's Tuple (t.Tuple) is not the repository's Tuple; a local function is not cross-file
    ordinary_lines = {h.line for h in ordinary}
    assert _line(USE, "t.Tuple") in ordinary_lines and _line(USE, "local_helper(total)") in ordinary_lines
    for h in cross + ordinary:  # the expected text is exactly the rest of the source line
        src = (repo / h.path).read_text().splitlines()[h.line]
        assert src[h.col:].rstrip() == h.expected and src[:h.col].strip() in ("", src[:h.col].strip())


def test_typed_holes_put_the_cursor_inside_the_name(repo: Path):
    """holes.py --typed: the cross-file holes that start with the name, its first characters typed; run.py's
    buffer ends after them and the line is scored whole (typed characters + completion)."""
    import run as R

    cross, ordinary = H.repo_holes("pkg", repo)
    holes = [vars(h) for h in cross + ordinary] * 2  # a place two sets hold is taken once
    typed = H.typed_holes(holes, 2)
    assert typed and len({(h["path"], h["line"], h["col"]) for h in typed}) == len(typed)
    assert {h["expected"] for h in typed} == {h.expected for h in cross if h.anchor == "identifier"}
    assert all(h["anchor"] == "typed" and h["typed"] == 2 for h in typed)
    assert len({h["id"] for h in typed}) == len(typed)
    total = next(h for h in typed if h["expected"] == "compute_total(values)")
    before, after = R.split_at_hole((repo / total["path"]).read_text(), total)
    assert before.endswith("total = co") and not after.split("\n")[0]
    whole = next(h for h in H.typed_holes(holes, None) if h["expected"] == "compute_total(values)")
    assert whole["typed"] == len("compute_total")
    assert R.split_at_hole((repo / whole["path"]).read_text(), whole)[0].endswith("total = compute_total")


def test_selection_is_deterministic_and_bounded(repo: Path):
    one = H.select("pkg", repo, 3, 2, seed=8)
    two = H.select("pkg", repo, 3, 2, seed=8)
    assert [vars(h) for h in one] == [vars(h) for h in two]
    assert sum(h.kind == "crossfile" for h in one) == 3 and sum(h.kind == "ordinary" for h in one) == 2
    assert len({(h.path, h.line) for h in one}) == len(one)
    assert [h.id for h in one] == [f"pkg-{i:03d}" for i in range(5)]


def test_metrics():
    assert edit_similarity("abc", "abc") == 1.0 and edit_similarity("", "x") == 0.0
    assert edit_similarity("kitten", "sitting") == pytest.approx(2 * 4 / 13)
    s = score("  x = foo(bar) ", "x = foo(bar)", ["foo"])
    assert s["em"] == 1.0 and s["id_em"] == 1.0 and s["id_f1"] == 1.0 and s["xid_hit"] == 1.0
    s = score("a[i:j]", "a[i : j]")
    assert s["em"] == 0.0 and s["em_nows"] == 1.0
    s = score("x = baz(bar)", "x = foo(bar)", ["foo"])
    assert s["em"] == 0.0 and s["xid_hit"] == 0.0 and s["id_recall"] == pytest.approx(2 / 3)


def test_retrieval_uses_other_files_and_fits_the_budget(repo: Path):
    files = ["pkg/defs.py", "pkg/use.py", "pkg/other.py"]
    index = SnippetIndex(repo, files)
    hits = index.top("total = compute_total(values)", "pkg/use.py")
    assert hits and hits[0][1].path == "pkg/defs.py" and all(w.path != "pkg/use.py" for _, w in hits)

    def count(text: str) -> int:
        return len(text.split())
    header, used = build_header(count, hits, 40)
    assert header.startswith("# Path: ") and count(header) <= 40 and used
    prefix = "\n".join(f"line {i} of the file" for i in range(50)) + "\n    total = "
    fitted = fit_prefix(count, header, prefix, 80)
    assert prefix.endswith(fitted) and count(header + fitted) <= 80 and fitted.endswith("    total = ")


@pytest.mark.skipif(not DATA.is_dir(), reason="needs the unpacked wheels in /work/data/eval")
def test_committed_holes_match_the_sources():
    rows = [json.loads(ln) for ln in (BENCH / "holes.jsonl").read_text().splitlines()]
    assert 60 <= len(rows) <= 120 and 0.15 <= sum(r["kind"] == "ordinary" for r in rows) / len(rows) <= 0.35
    assert {r["repo"] for r in rows} == {"requests", "flask", "click"}  # none of the fine-tuning repos
    regenerated = [vars(h) for h in H.select("requests", DATA / "requests", 15, 5, 8)]  # one repo: < 2 s of CPU
    assert regenerated == [r for r in rows if r["repo"] == "requests"]  # what the documented command produces
    trees: dict[Path, ast.Module] = {}

    def tree(p: Path) -> ast.Module:
        if p not in trees:
            trees[p] = ast.parse(p.read_text(encoding="utf-8"))
        return trees[p]
    for r in rows:
        root = DATA / r["repo"]
        line = (root / r["path"]).read_text(encoding="utf-8").split("\n")[r["line"]]
        assert line[r["col"]:].rstrip() == r["expected"] and not line[:r["col"]].strip() or r["anchor"] == "identifier"
        own = H.bound_names(tree(root / r["path"])) | H.definitions(tree(root / r["path"]))
        for x in r["xfile"]:
            assert x["name"] in r["expected"] and x["name"] not in own
            assert x["defined_in"] and r["path"] not in x["defined_in"]
            assert all(x["name"] in H.definitions(tree(root / g)) for g in x["defined_in"])


def test_report_paths_outside_the_repository_stay_absolute(tmp_path):
    """A --holes file outside the repository crashed the summary after a 20-minute run."""
    import run as R

    assert R._shown(tmp_path / "holes.jsonl") == str(tmp_path / "holes.jsonl")
    assert R._shown(R.REPO / "bench" / "crossfile" / "holes.jsonl") == "bench/crossfile/holes.jsonl"
    assert R._shown(Path("holes.jsonl")) == "holes.jsonl"


def _report(path: Path, system: str, holes: list[tuple[str, str, float, int]]) -> str:
    records = [{"system": system, "id": i, "expected": e, "metrics": {"es": es, "id_em": em, "xid_hit": em}}
               for i, e, es, em in holes]
    path.write_text(json.dumps({"records": records}))
    return str(path)


def test_paired_comparison_pairs_holes_pools_sets_and_refuses_different_holes(tmp_path, capsys):
    import paired

    base = _report(tmp_path / "a.json", "c", [("r-0", "x()", 0.5, 0), ("r-1", "y", 1.0, 1), ("r-2", "z", 0.2, 0)])
    # the candidate's records in another order: compared hole by hole, not line by line
    cand = _report(tmp_path / "b.json", "d", [("r-2", "z", 0.2, 0), ("r-0", "x()", 0.8, 1), ("r-1", "y", 0.9, 1)])
    assert paired.main([f"{base}:{cand}", f"{base}:{base}", "--json", str(tmp_path / "out.json")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    first = out[f"{base}:{cand}"]
    assert first["n"] == 3 and (first["better"], first["worse"]) == (1, 1)
    assert first["mean"] == pytest.approx((0.3 - 0.1) / 3) and first["id_em"] == [1, 2]
    diffs = [0.3, -0.1, 0.0]  # x(), y, z
    var = sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2
    assert first["se"] == pytest.approx((var / 3) ** 0.5)
    pooled = out["pooled"]
    assert pooled["n"] == 6 and pooled["mean"] == pytest.approx(0.2 / 6) and pooled["xid_hit"] == [2, 3]
    # another hole set reuses the ids (r-0, r-1, ...): the expected text tells them apart
    other = _report(tmp_path / "c.json", "d", [("r-0", "w", 0.8, 1), ("r-1", "y", 0.9, 1), ("r-2", "z", 0.2, 0)])
    assert paired.main([f"{base}:{other}"]) == 2
    assert "different holes" in capsys.readouterr().err
