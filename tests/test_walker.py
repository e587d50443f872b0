"""Walker: which files get indexed, with a reason for every one that does not.

Test Data: Lib/json from the running interpreter, copied into tmp repos built per test. Fake
credentials are assembled at run time so this file itself never looks like it holds one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from indexer import walker
from indexer.secrets import looks_like_secret, redact, secret_file_reason
from indexer.walker import Decision, WalkRules, explain, walk, walk_with_skips

JSON_DIR = Path(json.__file__).parent
FAKE_AWS = "AKIA" + "Z7Q2M4N8P0R3T5V9"
FAKE_PEM = "-----BEGIN " + "RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END " + "RSA PRIVATE KEY-----\n"
FAKE_GH = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"


@pytest.fixture(autouse=True)
def isolated_git_config(tmp_path, monkeypatch):
    """No test may see the real ~/.gitconfig or global excludes file."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return home


def make_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def decisions(root: Path, rules: WalkRules | None = None) -> dict[str, Decision]:
    return {d.path: d for d in walk_with_skips(root, rules or WalkRules())}


def indexed(root: Path, rules: WalkRules | None = None) -> list[str]:
    return [f.path for f in walk(root, rules or WalkRules())]


def test_stdlib_package_is_indexed_in_sorted_order(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(JSON_DIR, root / "json", ignore=shutil.ignore_patterns("__pycache__"))
    make_tree(root, {"json/__pycache__/decoder.cpython-311.pyc": b"\x00\x01", "README.md": "# r\n"})
    files = list(walk(root))
    assert [f.path for f in files] == ["README.md"] + sorted(f"json/{p.name}" for p in JSON_DIR.glob("*.py"))
    first = files[1]
    assert first.language == "python" and first.abs_path == root / first.path
    assert first.size == (root / first.path).stat().st_size
    assert decisions(root)["json/__pycache__/"].reason == "always skipped: bytecode cache"
    assert indexed(root) == [f.path for f in files]  # deterministic


def test_nested_gitignore_negation_and_parent_directory_rule(tmp_path):
    root = make_tree(
        tmp_path / "repo",
        {
            ".gitignore": "*.log\n!keep.log\nlogs/\n!logs/important.txt\ncache/*\n!cache/keep.txt\n",
            "a.log": "x",
            "keep.log": "x",
            "logs/important.txt": "x",
            "cache/junk.txt": "x",
            "cache/keep.txt": "x",
            "sub/.gitignore": "/local.txt\n!b.log\n",
            "sub/local.txt": "x",
            "sub/deeper/local.txt": "x",
            "sub/b.log": "x",
            "sub/c.log": "x",
        },
    )
    got = decisions(root)
    assert not got["a.log"].indexed and got["a.log"].reason == "ignored by .gitignore: *.log"
    assert got["keep.log"].indexed
    # git: "It is not possible to re-include a file if a parent directory of that file is excluded."
    assert got["logs/"].reason == "ignored by .gitignore: logs/" and "logs/important.txt" not in got
    assert "parent directory" not in explain(root, "logs/important.txt").reason
    assert not explain(root, "logs/important.txt").indexed
    assert got["cache/keep.txt"].indexed and not got["cache/junk.txt"].indexed  # `dir/*` is not `dir/`
    assert got["sub/local.txt"].reason == "ignored by sub/.gitignore: /local.txt"
    assert got["sub/deeper/local.txt"].indexed  # anchored to sub/, not to deeper/
    assert got["sub/b.log"].indexed  # the deeper file's negation wins
    assert not got["sub/c.log"].indexed


def test_longllamaignore_outranks_gitignore_beside_it(tmp_path):
    root = make_tree(
        tmp_path / "repo",
        {
            ".gitignore": "generated/\nwanted.txt\n",
            ".longllamaignore": "*.md\n!wanted.txt\n",
            "README.md": "x",
            "wanted.txt": "x",
            "generated/a.py": "x = 1\n",
            "docs/.longllamaignore": "draft*\n",
            "docs/draft1.py": "x",
            "docs/final.py": "x",
        },
    )
    got = decisions(root)
    assert got["README.md"].reason == "ignored by .longllamaignore: *.md"
    assert got["wanted.txt"].indexed
    assert got["generated/"].reason == "ignored by .gitignore: generated/"
    assert got["docs/draft1.py"].reason == "ignored by docs/.longllamaignore: draft*"
    assert got["docs/final.py"].indexed
    assert got["README.md"].reason == explain(root, "README.md").reason
    assert indexed(root, WalkRules(use_ignore_files=False, extra_ignores=("*.txt",))) == [
        ".gitignore",
        ".longllamaignore",
        "README.md",
        "docs/.longllamaignore",
        "docs/draft1.py",
        "docs/final.py",
        "generated/a.py",
    ]


def test_global_excludes_info_exclude_and_core_excludesfile(tmp_path, monkeypatch, isolated_git_config):
    root = make_tree(
        tmp_path / "repo",
        {
            ".git/info/exclude": "scratch/\n",
            ".git/HEAD": "ref: refs/heads/main\n",
            "a.swp": "x",
            "notes.private": "x",
            "scratch/x.py": "x",
            "main.py": "print(1)\n",
        },
    )
    xdg = tmp_path / "xdg"
    make_tree(xdg, {"git/ignore": "*.swp\n"})
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    got = decisions(root)
    assert got["a.swp"].reason == f"ignored by {xdg / 'git' / 'ignore'}: *.swp"
    assert got["scratch/"].reason == "ignored by .git/info/exclude: scratch/"
    assert got[".git/"].reason == "always skipped: version control metadata"
    assert got["notes.private"].indexed and got["main.py"].indexed
    # core.excludesFile replaces the XDG default (a `~` path, expanded against $HOME).
    make_tree(
        isolated_git_config,
        {
            ".gitconfig": '[user]\n\tname = x\n[core]\n\texcludesFile = "~/my-ignore"\n',
            "my-ignore": "*.private\n",
        },
    )
    got = decisions(root)
    assert got["notes.private"].reason.endswith("my-ignore: *.private")
    assert got["a.swp"].indexed


def test_subdirectory_of_a_repo_sees_parent_gitignore_unless_it_ignores_the_root(tmp_path):
    outer = make_tree(
        tmp_path / "outer",
        {
            ".git/HEAD": "x",
            ".gitignore": "*.tmp\nvendor/\n",
            "pkg/a.tmp": "x",
            "pkg/a.py": "x = 1\n",
            "vendor/lib/b.py": "y = 2\n",
        },
    )
    assert decisions(outer / "pkg")["a.tmp"].reason == f"ignored by {outer / '.gitignore'}: *.tmp"
    assert indexed(outer / "vendor" / "lib") == ["b.py"]  # the user chose an ignored root: index it


def test_always_skipped_directories_and_files(tmp_path):
    root = make_tree(
        tmp_path / "repo",
        {
            "node_modules/react/index.js": "x",
            "dist/app.js": "x",
            "target/debug/x.rs": "x",
            ".tox/py/x": "x",
            "myenv/pyvenv.cfg": "home = /usr\n",
            "myenv/lib/site.py": "x",
            "web/package.json": "{}",
            "web/out/main.js": "x",
            "other/out/result.txt": "x",
            "package-lock.json": "{}",
            "Cargo.lock": "x",
            "go.sum": "x",
            "uv.lock": "x",
            "app.min.js": "x",
            "locale/de/LC_MESSAGES/app.po": 'msgid "Not a valid choice."\nmsgstr "Keine gültige Auswahl."\n',
            "locale/app.pot": 'msgid "Not a valid choice."\nmsgstr ""\n',
            "api_pb2.py": "x",
            "gen.go": "// Code generated by protoc-gen-go. DO NOT EDIT.\npackage x\n",
            "bundle.js": "var a=1;" * 300,
            "notes.md": "word " * 500,
            "image.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
            "big.py": "x = 1\n" * 600,
        },
    )
    got = decisions(root, WalkRules(max_bytes=3000))
    for d in ["node_modules/", "dist/", "target/", ".tox/"]:
        assert got[d].reason.startswith("always skipped"), d
    assert got["myenv/"].reason == "always skipped: virtualenv (has pyvenv.cfg)"
    assert got["web/out/"].reason.startswith("always skipped: build output")
    assert got["other/out/result.txt"].indexed  # `out/` only counts as build output next to package.json
    for lock in ["package-lock.json", "Cargo.lock", "go.sum", "uv.lock"]:
        assert got[lock].reason == "lock file"
    assert got["app.min.js"].reason == "minified file (by its name)"
    assert got["locale/de/LC_MESSAGES/app.po"].reason == got["locale/app.pot"].reason == "translation catalog"
    assert got["api_pb2.py"].reason == "generated file (by its name)"
    assert got["gen.go"].reason == "generated file (header says 'DO NOT EDIT')"
    assert got["bundle.js"].reason.startswith("minified or machine-written")
    assert got["notes.md"].indexed  # prose may have long lines
    assert got["image.png"].reason == "binary (NUL byte in the first 8 KiB)"
    assert got["big.py"].reason == "too large (3.5 KiB > --max-file-kb 2.9)"  # the option's name and unit
    assert got["web/package.json"].indexed


def test_secrets_are_never_indexed_by_default(tmp_path):
    root = make_tree(
        tmp_path / "repo",
        {
            ".env": "DB_PASSWORD=hunter2\n",
            ".env.example": "DB_PASSWORD=\n",
            "id_rsa": "x",
            "id_rsa.pub": "ssh-rsa AAA",
            "server.pem": "x",
            "deploy/prod.tfvars": "x",
            "secrets.yaml": "x",
            ".npmrc": "x",
            "config.py": f"REGION = 'eu'\nAWS_KEY = '{FAKE_AWS}'\n",
            "key.txt": FAKE_PEM,
            "ci.sh": f"export GH={FAKE_GH}\n",
            "settings.py": 'api_key = "q8Zr3kT1vB6nW0yX5mL2"\n',
            "secrets.py": "import os\n",
            "clean.py": 'token = "<your token here>"\npassword = "x"\n',
        },
    )
    got = decisions(root)
    for name in [
        ".env",
        ".env.example",
        "id_rsa",
        "server.pem",
        "deploy/prod.tfvars",
        "secrets.yaml",
        ".npmrc",
    ]:
        assert not got[name].indexed and got[name].reason.startswith("secret:"), name
    assert "templates like .env.example" in got[".env.example"].reason
    assert got["config.py"].reason.startswith("secret: AWS Access Key (detect-secrets AWSKeyDetector) on line 2")
    assert "Private Key" in got["key.txt"].reason
    assert "GitHub Token" in got["ci.sh"].reason
    assert "Secret Keyword (detect-secrets KeywordDetector)" in got["settings.py"].reason
    assert FAKE_AWS not in got["config.py"].reason  # reasons never echo the secret
    assert got["secrets.py"].indexed and got["clean.py"].indexed and got["id_rsa.pub"].indexed
    assert explain(root, ".env").reason == got[".env"].reason
    with_secrets = decisions(root, WalkRules(include_secrets=True))
    assert with_secrets[".env"].indexed and with_secrets["config.py"].indexed


def test_looks_like_secret_and_redact():
    assert looks_like_secret(f"x = 1\ny = '{FAKE_AWS}'") == "AWS Access Key (detect-secrets AWSKeyDetector) on line 2"
    anthropic = "sk-" + "ant-api03-" + "Zx81Kq02Lm93Nb74Vc65Xd" * 4 + "abcde" + "AA"
    assert looks_like_secret(anthropic) == "gitleaks anthropic-api-key on line 1"
    assert looks_like_secret("risk-assessment-of-the-whole-project") is None  # `sk-` inside words
    assert looks_like_secret("password = 'aaaaaaaaaaaaaaaaaaaa'") is None  # low entropy
    assert looks_like_secret("def tokenize(text):\n    return text.split()\n") is None
    masked = redact(f"auth failed for key {FAKE_AWS} (token {FAKE_GH})")
    assert masked == "auth failed for key [REDACTED] (token [REDACTED])"
    assert secret_file_reason("a/.aws/credentials") == "credential file"
    assert secret_file_reason("src/secrets.py") is None


def test_symlinks_are_never_followed_and_loops_terminate(tmp_path):
    root = make_tree(tmp_path / "repo", {"a/real.py": "x = 1\n"})
    outside = make_tree(tmp_path / "outside", {"stolen.py": "y = 2\n"})
    (root / "a" / "loop").symlink_to("..")
    (root / "self").symlink_to("self")
    (root / "escape").symlink_to(outside)
    (root / "escape.py").symlink_to(outside / "stolen.py")
    (root / "alias.py").symlink_to(root / "a" / "real.py")
    (root / "dangling.py").symlink_to(root / "missing.py")
    got = decisions(root)
    assert indexed(root) == ["a/real.py"]
    assert got["a/loop"].reason.startswith("symlink to")  # the root itself: not followed
    assert got["self"].reason == "symlink loop"
    assert got["escape"].reason.startswith("symlink leaves the root")
    assert got["escape.py"].reason.startswith("symlink leaves the root")
    assert got["alias.py"].reason.startswith("symlink to a/real.py")
    assert got["dangling.py"].reason == "broken symlink"
    assert explain(root, "a/loop/a/real.py").reason.startswith("inside a/loop/, a symlink")


def test_unreadable_vanishing_and_special_files_are_skipped(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "repo", {"a.py": "x", "b.py": "x", "c/d.py": "x"})
    os.mkfifo(root / "pipe")  # opening a FIFO would block the walk forever
    stream = walk_with_skips(root)
    first = next(stream)
    (root / "b.py").unlink()
    rest = {d.path: d for d in stream}
    assert first.path == "a.py" and rest["b.py"].reason == "vanished during the walk"
    assert rest["pipe"].reason == "not a regular file (fifo, socket or device)"
    assert rest["c/d.py"].indexed
    # Permission errors, simulated so the test also means something when run as root.
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "c":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    def deny_open(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(walker.os, "scandir", scandir)
    monkeypatch.setattr(walker, "read_regular", deny_open)
    got = decisions(root)
    assert got["a.py"].reason == "unreadable: Permission denied"
    assert got["c/"].reason == "unreadable directory: Permission denied"


def test_explain(tmp_path):
    root = make_tree(
        tmp_path / "repo",
        {
            ".gitignore": "build2/\n",
            "src/app.py": "print(1)\n",
            "build2/x.py": "x",
            "node_modules/m/i.js": "x",
        },
    )
    app = next(f for f in walk(root) if f.path == "src/app.py")
    assert explain(root, "src/app.py") == Decision(True, "indexed (python)", "src/app.py", app)
    assert explain(root, root / "src" / "app.py").indexed  # absolute paths too
    assert (
        explain(root, "build2/x.py").reason
        == "inside skipped directory build2/: ignored by .gitignore: build2/"
    )
    assert explain(root, "node_modules/m/i.js").reason.startswith("inside skipped directory node_modules/")
    assert explain(root, "../elsewhere.py").reason.startswith("outside the root")
    assert explain(root, "src").reason == "directory is walked"
    assert explain(root, "nope.py").reason.startswith("cannot stat")


GIT_CASES = {
    ".gitignore": "*.log\n!keep.log\nlogs/\n!logs/important.txt\ncache/*\n!cache/keep.txt\n/only_top.txt\n"
    "docs/**/draft*\n*.py[co]\n[!a]x.txt\n\\#hash.txt\nspace\\ \n",
    "only_top.txt": "",
    "a/only_top.txt": "",
    "keep.log": "",
    "x.log": "",
    "logs/important.txt": "",
    "logs/other.txt": "",
    "cache/keep.txt": "",
    "cache/junk.txt": "",
    "docs/a/b/draft1.md": "",
    "docs/final.md": "",
    "m.pyc": "",
    "m.py": "",
    "bx.txt": "",
    "ax.txt": "",
    "#hash.txt": "",
    "space ": "",
    "wl/.gitignore": "*\n!*/\n!*.py\n",
    "wl/a.py": "",
    "wl/b.txt": "",
    "wl/sub/c.py": "",
    "wl/sub/d.md": "",
    "top/.gitignore": "/*\n!/src/\n",
    "top/src/a.txt": "",
    "top/other.txt": "",
    "deep/.gitignore": "x/**\n!x/keep.txt\n",
    "deep/x/keep.txt": "",
    "deep/x/y.txt": "",
    "neg/.gitignore": "!*.log\n",
    "neg/n.log": "",
    "neg/sub/.gitignore": "*.md\n",
    "neg/sub/s.md": "",
}


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git binary")
def test_ignore_rules_agree_with_git(tmp_path, isolated_git_config):
    """Cross-check against git itself, in a scratch repo under tmp_path (never this repository)."""
    import subprocess

    root = make_tree(tmp_path / "scratch", GIT_CASES)
    env = {"HOME": str(isolated_git_config), "GIT_CONFIG_NOSYSTEM": "1", "PATH": os.environ["PATH"]}
    subprocess.run(["git", "init", "-q", str(root)], check=True, env=env)
    listed = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard", "-z"],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert sorted(p for p in listed.split("\0") if p) == sorted(indexed(root))


# -- hostile names and ignore files (issue 18) ---------------------------------------------------------

def test_undecodable_file_names_are_skipped_and_reported(tmp_path):
    """`bad_\\xff.py` (not UTF-8) used to crash the store with UnicodeEncodeError; now it is one skip."""
    root = make_tree(tmp_path / "repo", {"ok.py": "x = 1\n"})
    os.mkdir(os.path.join(os.fsencode(root), b"dir_\xfe"))
    for name in (b"bad_\xff.py", b"dir_\xfe/inner.py"):
        with open(os.path.join(os.fsencode(root), name), "wb") as f:
            f.write(b"y = 2\n")
    got = decisions(root)
    assert got["ok.py"].indexed
    assert got["bad_\ufffd.py"].reason == "file name is not valid UTF-8"
    assert got["dir_\ufffd"].reason == "file name is not valid UTF-8"  # pruned with its contents
    for d in got.values():
        d.path.encode("utf-8")  # every path the store and the editor see is text


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "huge", "symlink-to-file"])
def test_ignore_files_are_read_only_if_regular_and_small(tmp_path, kind):
    """A `.gitignore` -> /dev/zero ended in MemoryError, a FIFO hung the walk. Git itself does not
    follow a symlinked .gitignore; neither do we, and one over 1 MiB is not read at all."""
    root = make_tree(tmp_path / "repo", {"a.py": "x = 1\n", "sub/b.py": "y = 2\n", "rules.txt": "a.py\n"})
    for ignore in (root / ".gitignore", root / "sub" / ".longllamaignore"):
        if kind == "dev-zero":
            ignore.symlink_to("/dev/zero")
        elif kind == "fifo":
            os.mkfifo(ignore)
        elif kind == "huge":
            ignore.write_text("a.py\n" + "#" * walker.IGNORE_FILE_MAX_BYTES)
        else:
            ignore.symlink_to(root / "rules.txt")
    got = decisions(root)  # returns: no hang, no MemoryError
    assert got["a.py"].indexed and got["sub/b.py"].indexed  # those ignore files were not used
    assert explain(root, "a.py").indexed


def test_walk_never_blocks_on_a_fifo_swapped_in_for_a_file(tmp_path, monkeypatch):
    """lstat said regular, then the file became a FIFO: reading it must not block."""
    root = make_tree(tmp_path / "repo", {"a.py": "x = 1\n"})
    real_lstat = walker._Walker.decide_file

    def swap(self, path, rel, st, levels):
        if rel == "a.py":
            path.unlink()
            os.mkfifo(path)
        return real_lstat(self, path, rel, st, levels)
    monkeypatch.setattr(walker._Walker, "decide_file", swap)
    assert decisions(root)["a.py"].reason == "not a regular file (changed during the walk)"


# -- secrets: the maintained rule set (detect-secrets plugins + gitleaks rules) ---------------------------

# Assembled at run time so this file never looks like it holds a credential. Each value is in the
# format the probe planted; "rule" is the start of the reason `--explain` prints.
JWT = "eyJ" + "hbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9" + ".eyJzdWIiOiIxMjM0NTY3ODkwIn0" + ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
PROBED = [  # (file, its text with {} for the secret, the secret, the rule)
    (".envrc.sh", "export DATABASE_PASSWORD={}\n", "Zx9Qv7Lm3Np8Rt2K", "Secret Keyword"),
    ("deploy/settings.cfg", "[db]\npassword = {}\n", "s3cr3tPassw0rdValue", "Secret Keyword"),
    ("deploy/app.ini", "[auth]\nsecret_key={}\n", "q8Zr3kT1vB6nW0yX5mL2", "Secret Keyword"),
    ("k8s/values.yaml", "db:\n  password: {}\n", "s3cr3tPassw0rdValue", "Secret Keyword"),
    ("app/client.py", 'HEADERS = {{"Authorization": "Bearer {}"}}\n', JWT, "JSON Web Token"),
    ("app/db.py", 'URL = "postgres://admin:{}@db.internal:5432/app"\n', "Sup3rS3cret", "Basic Auth Credentials"),
    ("ci/gitlab.py", 'TOKEN = "{}"\n', "glpat-" + "Abcdefghij1234567890", "GitLab Token"),
    ("ci/publish.sh", "NPM_TOKEN={}\n", "npm_" + "abcdefghijklmnopqrstuvwxyz0123456789", "gitleaks npm-access-token"),
    ("ml/hub.py", 'HF_TOKEN = "{}"\n', "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567", "gitleaks huggingface-access-token"),
    ("mail/send.py", 'KEY = "{}"\n', "SG." + "ngeVfQFYQlKU0ufo8x5d1A.TwL2iGABf9DHoTf-09kqeF8tAmbihYzrnopKc-1s5cr",
     "SendGrid API Key"),
    ("aws/conf.py", 'AWS_ACCESS_KEY_ID = "{}"\n', "AKIA" + "IOSFODNN7EXAMPLE", "AWS Access Key"),
    ("aws/creds.ini", "aws_secret_access_key = {}\n", "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY", "Secret Keyword"),
]
PROBED_NAMES = [".envrc", ".kube/config", "home/.docker/config.json", "infra/terraform.tfstate.backup",
                "infra/prod.tfvars.json", ".aws/credentials", "kubeconfig"]


def test_probed_secret_formats_are_not_indexed_and_explain_names_the_rule(tmp_path):
    files = {name: text.format(secret) for name, text, secret, _ in PROBED}
    files.update({name: "x = 1\n" for name in PROBED_NAMES})
    root = make_tree(tmp_path / "repo", {**files, "clean.py": "def f(password):\n    return check(password)\n"})
    got = decisions(root)
    for name, _, secret, rule in PROBED:
        reason = explain(root, name).reason
        assert not got[name].indexed and reason == got[name].reason, (name, reason)
        assert reason.startswith(f"secret: {rule}") and " on line " in reason, (name, reason)
        assert secret[-8:] not in reason  # reasons never echo the secret
    for name in PROBED_NAMES:
        assert not got[name].indexed and got[name].reason.startswith("secret: "), name
    assert got["clean.py"].indexed
    assert decisions(root, WalkRules(include_secrets=True))["app/db.py"].indexed


def test_redact_masks_each_probed_format():
    for _, text, secret, _ in PROBED:
        masked = redact(text.format(secret))
        assert masked == text.format("[REDACTED]"), masked
