"""Line-completion metrics as CrossCodeEval computes them: exact match and edit similarity of the
line (whitespace-stripped; em_nows also ignores whitespace inside the line, `a[i : j]` = `a[i:j]`), identifier exact match and precision/recall/F1, plus the share of holes
whose cross-file identifiers all appear in the completion."""

from __future__ import annotations

import keyword
import re
from collections import Counter

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def code_identifiers(text: str) -> list[str]:
    """Identifiers of a line, keywords and string contents excluded (a rough lexer: quotes dropped)."""
    text = re.sub(r"#.*", "", re.sub(r"(\"[^\"]*\"|'[^']*')", " ", text))
    return [t for t in _IDENT.findall(text) if not keyword.iskeyword(t)]


def edit_similarity(a: str, b: str) -> float:
    """Indel similarity 2*LCS/(|a|+|b|) in [0, 1] (what rapidfuzz/thefuzz `fuzz.ratio` computes / 100)."""
    if not a and not b:
        return 1.0
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return 2 * prev[-1] / (len(a) + len(b))


def score(prediction: str, expected: str, xfile_names: list[str] = ()) -> dict[str, float]:
    p, e = prediction.strip(), expected.strip()
    pi, ei = code_identifiers(p), code_identifiers(e)
    common = sum((Counter(pi) & Counter(ei)).values())
    prec = common / len(pi) if pi else float(not ei)
    rec = common / len(ei) if ei else 1.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    out = {"em": float(p == e), "em_nows": float("".join(p.split()) == "".join(e.split())),
           "es": edit_similarity(p, e), "id_em": float(pi == ei),
           "id_precision": prec, "id_recall": rec, "id_f1": f1}
    if xfile_names:
        out["xid_hit"] = float(all(n in pi for n in xfile_names))
    return out
