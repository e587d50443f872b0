"""indexer.priority: the open files, then what they import, then what git says changed, then the rest.

Test Data: copies of the stdlib `email` package (Python imports, absolute and relative spellings),
small JavaScript, C and Go files written here for their import syntax, and a throwaway git
repository made with the git binary.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from indexer.languages import language_for
from indexer.priority import imported_paths, recently_changed, tiers
from indexer.walker import WalkedFile, walk

STDLIB = Path(json.__file__).parent.parent


def email_copy(root: Path) -> tuple[Path, list[str]]:
    shutil.copytree(STDLIB / "email", root / "email", ignore=shutil.ignore_patterns("__pycache__"))
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return root, paths


def walked(root: Path) -> dict[str, WalkedFile]:
    """What the pipeline hands `tiers`: the walk's files (size and language known) by path."""
    return {f.path: f for f in walk(root)}


def test_open_file_then_its_imports_then_theirs_then_the_rest(tmp_path):
    root, paths = email_copy(tmp_path)
    t = tiers(walked(root), ["email/utils.py", "not/here.py"], lambda p: (root / p).read_bytes(), ready_bytes=10**6)
    assert t.open == ["email/utils.py"]
    # utils imports _parseaddr and charset; charset imports base64mime, quoprimime, errors, encoders
    assert t.imports == ["email/_parseaddr.py", "email/charset.py"]
    assert {"email/base64mime.py", "email/quoprimime.py", "email/errors.py", "email/encoders.py"} <= set(t.further)
    assert "email/mime/image.py" in t.rest
    everything = t.open + t.imports + t.further + t.recent + t.rest
    assert sorted(everything) == paths  # each path exactly once


def test_the_ready_tier_is_capped_by_source_bytes(tmp_path):
    """utils.py (17 kB) imports _parseaddr.py (18 kB) and charset.py (17 kB): with room for one import,
    the first is taken, the second waits in 'further' ahead of the imports' own imports."""
    root, paths = email_copy(tmp_path)
    def read(p):
        return (root / p).read_bytes()
    open_size, first, second = (len(read(f"email/{n}.py")) for n in ("utils", "_parseaddr", "charset"))
    t = tiers(walked(root), ["email/utils.py"], read, ready_bytes=open_size + first + second - 1)
    assert (t.open, t.imports) == (["email/utils.py"], ["email/_parseaddr.py"])
    assert t.further[0] == "email/charset.py"
    assert sorted(t.open + t.imports + t.further + t.recent + t.rest) == paths
    reads = []
    tight = tiers(walked(root), ["email/utils.py"], lambda p: reads.append(p) or read(p), ready_bytes=1)
    assert (tight.open, tight.imports, tight.further[:2]) == (["email/utils.py"], [], ["email/_parseaddr.py",
                                                                                         "email/charset.py"])
    assert reads == ["email/utils.py"]  # sizes are the walk's: only a file whose imports are parsed is read


def test_python_import_spellings(tmp_path):
    root, paths = email_copy(tmp_path)
    known = set(paths)
    (root / "email/mime/x.py").write_text("from .. import header\nfrom ..errors import HeaderParseError\n"
                                          "from . import base as b\nimport email.feedparser\n"
                                          "try:\n    from email import policy\nexcept ImportError:\n    pass\n")
    found = imported_paths("email/mime/x.py", "python", (root / "email/mime/x.py").read_bytes(), known)
    assert found == ["email/__init__.py", "email/header.py", "email/errors.py", "email/mime/__init__.py",
                     "email/mime/base.py", "email/feedparser.py", "email/policy.py"]


@pytest.mark.parametrize("path, source, known, expected", [
    ("web/src/app.ts", b"import { a } from './util';\nimport x from 'react';\nconst c = require('../lib/c.js');\n",
     {"web/src/util.ts", "web/lib/c.js", "web/src/app.ts"}, ["web/src/util.ts", "web/lib/c.js"]),
    ("src/main.c", b'#include <stdio.h>\n#include "util.h"\n#ifdef X\n#include "inc/cfg.h"\n#endif\n',
     {"src/util.h", "include/inc/cfg.h"}, ["src/util.h", "include/inc/cfg.h"]),
    ("cmd/main.go", b'package main\nimport (\n\t"fmt"\n\t"example.com/mod/pkg/store"\n)\n',
     {"pkg/store/store.go", "pkg/store/store_test.go", "pkg/other/o.go"}, ["pkg/store/store.go"]),
])
def test_other_languages(path, source, known, expected):
    assert imported_paths(path, language_for(path, source), source, known) == expected


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), "-c", "user.email=t@t", "-c", "user.name=t", *args], check=True,
                   capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_recently_changed_work_tree_first_then_last_commits(tmp_path):
    root, paths = email_copy(tmp_path)
    git(root, "init", "-q")
    git(root, "add", "email")
    git(root, "commit", "-qm", "one")
    (root / "email/mime/text.py").write_text("# edited\n")
    git(root, "add", "email/mime/text.py")
    git(root, "commit", "-qm", "two")
    (root / "email/header.py").write_text("# edited in the work tree\n")
    recent = recently_changed(root)
    assert recent[:2] == ["email/header.py", "email/mime/text.py"]
    assert recently_changed(root / "email")[:2] == ["header.py", "mime/text.py"]  # relative to a subfolder root
    t = tiers(walked(root), ["email/utils.py"], lambda p: (root / p).read_bytes(), recent)
    assert t.recent[:2] == ["email/header.py", "email/mime/text.py"]


def test_no_git_repository_means_no_recent_tier(tmp_path):
    root, _ = email_copy(tmp_path)
    assert recently_changed(root) == []
