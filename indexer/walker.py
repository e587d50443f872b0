"""Which files of a repository get indexed, and why the others do not.

`walk(root)` yields the files to index; `walk_with_skips(root)` yields a `Decision` for every file
(and every pruned directory) it sees, for `longllama status`; `explain(root, path)` answers for one
path, for `longllama index --explain PATH`. All three apply the same rules in the same order.

Ignore files follow git (https://git-scm.com/docs/gitignore): `.gitignore` in every directory,
patterns relative to it, deeper files and later lines win, `!` negates, and a file inside an
excluded directory cannot be re-included (we never descend into it). Below those: `.git/info/exclude`
and the global excludes file (`core.excludesFile`, else `$XDG_CONFIG_HOME/git/ignore` or
`~/.config/git/ignore`). A `.longllamaignore` in any directory has the same syntax and outranks the
`.gitignore` beside it. Git itself is never run.

Walk order is deterministic: depth-first, entries of each directory sorted by name. Symlinks are
never followed (like git, which stores them as links): inside the root their target is walked at its
own path anyway, and outside it they would leak files; loops are impossible by construction, and a
(device, inode) check guards against bind-mount cycles.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from indexer.languages import language_for
from indexer.secrets import looks_like_secret, secret_file_reason
from longllama_lsp.safefile import UnsafeFile, read_regular

logger = logging.getLogger(__name__)

IGNORE_FILES = (".gitignore", ".longllamaignore")  # per directory, later outranks earlier
IGNORE_FILE_MAX_BYTES = 1 << 20  # ignore files and git config are a few KiB; a larger one is hostile

# Directory names never walked, whatever the ignore files say (value: the reason shown).
SKIP_DIRS: dict[str, str] = {
    ".git": "version control metadata",
    ".hg": "version control metadata",
    ".svn": "version control metadata",
    ".longllama": "longllama's own index",
    "node_modules": "dependencies (node_modules)",
    "__pycache__": "bytecode cache",
    ".venv": "virtualenv",
    "venv": "virtualenv",
    ".tox": "tox environments",
    ".nox": "nox environments",
    ".mypy_cache": "tool cache",
    ".pytest_cache": "tool cache",
    ".ruff_cache": "tool cache",
    ".eggs": "build output",
    "build": "build output",
    "dist": "build output",
    "target": "build output",
    ".next": "build output",
    ".gradle": "build cache",
    ".cache": "tool cache",
}
LOCK_FILES = frozenset(
    {
        "package-lock.json",
        "npm-shrinkwrap.json",
        "yarn.lock",
        "pnpm-lock.yaml",
        "bun.lockb",
        "poetry.lock",
        "Pipfile.lock",
        "uv.lock",
        "pdm.lock",
        "Cargo.lock",
        "composer.lock",
        "Gemfile.lock",
        "go.sum",
        "flake.lock",
        "mix.lock",
        "Podfile.lock",
        "packages.lock.json",
    }
)
_GENERATED_NAME = re.compile(r"_pb2(_grpc)?\.pyi?$|\.pb\.(go|cc|h)$|\.g\.dart$|\.generated\.|\.designer\.cs$")
_MINIFIED_NAME = re.compile(r"\.min\.(js|mjs|css)$|\.(js|css)\.map$")
_GENERATED_HEADER = re.compile(rb"@generated|DO NOT EDIT|(?i:auto-?generated|automatically generated)")
# Translation catalogs: the same messages once per language (WTForms ships 32 `.po` files: two thirds of its
# memory tokens and of its index time), data that translators edit, not code a completion or an answer reads.
_CATALOG_SUFFIXES = frozenset({".po", ".pot", ".xlf", ".xliff"})
_PROSE_SUFFIXES = frozenset({".md", ".markdown", ".rst", ".txt", ".adoc", ".org", ".tex"})
BINARY_SNIFF = 8192  # bytes checked for a NUL, as git's own binary heuristic does


@dataclass(frozen=True)
class WalkRules:
    max_bytes: int = 1 << 20  # 1 MiB: larger files are data or generated, not code worth memory
    include_secrets: bool = False  # credential files and files holding keys/tokens stay out unless asked
    use_ignore_files: bool = True  # .gitignore, .longllamaignore, info/exclude, global excludes
    extra_ignores: tuple[str, ...] = ()  # gitignore-syntax patterns (from settings), relative to root
    minified_line_chars: int = 300  # average line length above which code counts as minified


@dataclass(frozen=True)
class WalkedFile:
    path: str  # relative to the root, POSIX separators
    abs_path: Path
    size: int  # bytes
    language: str  # languages.language_for: "python", "tsx", ..., or a text format ("markdown", "text")


@dataclass(frozen=True)
class Decision:
    indexed: bool
    reason: str
    path: str = ""  # relative to the root; pruned directories end with "/"
    file: WalkedFile | None = None  # set when indexed


@dataclass(frozen=True)
class IgnoreRule:
    """One gitignore line, compiled (https://git-scm.com/docs/gitignore#_pattern_format)."""

    pattern: str  # the line as written, for reasons
    negate: bool  # `!pattern`
    dir_only: bool  # `pattern/`
    basename_only: bool  # no `/` inside: matches the name at any depth
    regex: re.Pattern[str]  # full match against the name, or the path relative to the ignore file


@dataclass(frozen=True)
class _IgnoreLevel:
    base: str  # directory of the ignore file relative to the repo top, "" or ending in "/"
    rules: tuple[IgnoreRule, ...]
    source: str  # shown in reasons, e.g. "src/.gitignore"


_Frame = tuple[str, tuple[_IgnoreLevel, ...], Iterator[os.DirEntry[str]]]  # (rel dir, levels, entries left)


def walk(root: Path, rules: WalkRules = WalkRules()) -> Iterator[WalkedFile]:
    """Files to index under `root`, in deterministic order."""
    for decision in walk_with_skips(root, rules):
        if decision.file is not None:
            yield decision.file


def walk_with_skips(root: Path, rules: WalkRules = WalkRules(), *, read: bool = True) -> Iterator[Decision]:
    """A Decision for every file seen, and one per pruned directory (its contents are not listed).

    read=False: names and lstat only; the caller applies `content_reason` to the bytes it reads (the
    pipeline does, once, and only for files whose size or mtime changed)."""
    return _Walker(Path(root), rules, read).walk()


def explain(root: Path, path: Path | str, rules: WalkRules = WalkRules(), *, read: bool = True) -> Decision:
    """Why `path` (absolute, or relative to `root`) is or is not indexed."""
    return _Walker(Path(root), rules, read).explain(Path(path))


class _Walker:
    def __init__(self, root: Path, rules: WalkRules, read: bool = True):
        self.root = Path(os.path.abspath(root))
        self.rules, self.read = rules, read
        self.top, self.offset, self.base_levels = _repo_context(self.root, rules.use_ignore_files)
        self.extra = (
            _IgnoreLevel(self.offset, parse_ignore_lines(rules.extra_ignores), "settings")
            if rules.extra_ignores
            else None
        )

    # -- the two entry points ----------------------------------------------------------

    def walk(self) -> Iterator[Decision]:
        try:
            root_stat = os.stat(self.root)
        except OSError as err:
            yield Decision(False, f"root unreadable: {err.strerror}", "")
            return
        visited = {(root_stat.st_dev, root_stat.st_ino)}
        stack: list[_Frame] = []
        yield from self.open_dir(stack, self.root, "", self.base_levels)
        while stack:
            rel_dir, levels, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            decision = self.visit(entry, rel, levels, visited)
            if decision is None:  # a directory to descend into, depth-first
                yield from self.open_dir(stack, Path(entry.path), rel, levels)
            else:
                yield decision

    def open_dir(
        self, stack: list[_Frame], directory: Path, rel: str, levels: tuple[_IgnoreLevel, ...]
    ) -> Iterator[Decision]:
        """Push `directory`'s sorted entries on the stack, or yield why it cannot be listed."""
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            yield Decision(False, f"unreadable directory: {err.strerror}", f"{rel}/" if rel else "")
            return
        stack.append((rel, self.enter(directory, rel, levels), iter(entries)))

    def visit(
        self,
        entry: os.DirEntry[str],
        rel: str,
        levels: tuple[_IgnoreLevel, ...],
        visited: set[tuple[int, int]],
    ) -> Decision | None:
        """The Decision for one directory entry; None for a directory that should be walked."""
        shown = printable_path(rel)
        if shown != rel:  # the store, the logs and the editor all need text: skipped, never a crash
            return Decision(False, "file name is not valid UTF-8", shown)
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            return Decision(False, "vanished during the walk", rel)
        if not stat.S_ISDIR(st.st_mode):
            return self.decide_file(Path(entry.path), rel, st, levels)
        reason = self.dir_reason(Path(entry.path), rel, levels)
        if reason is None and (st.st_dev, st.st_ino) in visited:
            reason = "directory already walked (a filesystem cycle)"
        if reason is not None:
            return Decision(False, reason, rel + "/")
        visited.add((st.st_dev, st.st_ino))
        return None

    def explain(self, path: Path) -> Decision:
        absolute = Path(os.path.abspath(self.root / path))
        try:
            rel = absolute.relative_to(self.root).as_posix()
        except ValueError:
            return Decision(False, f"outside the root {self.root}", str(path))
        if rel == ".":
            return Decision(True, "the root directory is walked", "")
        levels = self.enter(self.root, "", self.base_levels)
        parts = rel.split("/")
        for i in range(1, len(parts)):
            dir_rel = "/".join(parts[:i])
            dir_abs = self.root / dir_rel
            if os.path.islink(dir_abs):
                return Decision(False, f"inside {dir_rel}/, a symlink (symlinks are not followed)", rel)
            reason = self.dir_reason(dir_abs, dir_rel, levels)
            if reason is not None:
                return Decision(False, f"inside skipped directory {dir_rel}/: {reason}", rel)
            levels = self.enter(dir_abs, dir_rel, levels)
        try:
            st = os.lstat(absolute)
        except OSError as err:
            return Decision(False, f"cannot stat: {err.strerror}", rel)
        if stat.S_ISDIR(st.st_mode):
            reason = self.dir_reason(absolute, rel, levels)
            return Decision(reason is None, reason or "directory is walked", rel + "/")
        return self.decide_file(absolute, rel, st, levels)

    # -- rules ----------------------------------------------------------------------------

    def enter(
        self, directory: Path, rel_dir: str, levels: tuple[_IgnoreLevel, ...]
    ) -> tuple[_IgnoreLevel, ...]:
        """Levels in effect inside `directory`: the parent's plus its own ignore files."""
        if not self.rules.use_ignore_files:
            return levels
        base = f"{self.offset}{rel_dir}/" if rel_dir else self.offset
        for name in IGNORE_FILES:
            level = _load_level(directory / name, base, f"{rel_dir}/{name}" if rel_dir else name)
            if level is not None:
                levels = (*levels, level)
        return levels

    def dir_reason(self, directory: Path, rel: str, levels: tuple[_IgnoreLevel, ...]) -> str | None:
        name = directory.name
        if name in SKIP_DIRS:
            return f"always skipped: {SKIP_DIRS[name]}"
        if os.path.exists(directory / "pyvenv.cfg"):
            return "always skipped: virtualenv (has pyvenv.cfg)"
        if name == "out" and os.path.exists(directory.parent / "package.json"):
            return "always skipped: build output (out/ beside package.json)"
        return self.ignored(rel + "/", levels)

    def ignored(self, rel: str, levels: tuple[_IgnoreLevel, ...]) -> str | None:
        """The ignore rule that excludes `rel` (dirs end with "/"), or None; the deepest match decides."""
        match = _deepest_match(self.offset + rel, (*levels, self.extra) if self.extra else levels)
        if match is None:
            return None
        level, rule = match
        return f"ignored by {level.source}: {rule.pattern}"

    def decide_file(
        self, path: Path, rel: str, st: os.stat_result, levels: tuple[_IgnoreLevel, ...]
    ) -> Decision:
        if stat.S_ISLNK(st.st_mode):
            return Decision(False, self.symlink_reason(path), rel)
        if not stat.S_ISREG(st.st_mode):
            return Decision(False, "not a regular file (fifo, socket or device)", rel)
        reason = self.name_reason(rel, levels)
        if reason is not None:
            return Decision(False, reason, rel)
        if st.st_size > self.rules.max_bytes:
            return Decision(False, f"too large ({_kib(st.st_size)} > --max-file-kb {_kib(self.rules.max_bytes, '')})", rel)
        if not self.read:
            return Decision(True, "indexed (content not checked yet)", rel, WalkedFile(rel, path, st.st_size, language_for(rel)))
        try:
            data, _ = read_regular(path, self.rules.max_bytes + 1)
        except FileNotFoundError:
            return Decision(False, "vanished during the walk", rel)
        except UnsafeFile:  # replaced by a symlink, FIFO or device since the lstat
            return Decision(False, "not a regular file (changed during the walk)", rel)
        except OSError as err:
            return Decision(False, f"unreadable: {err.strerror or err}", rel)
        reason = content_reason(rel, data, self.rules)
        if reason is not None:
            return Decision(False, reason, rel)
        language = language_for(rel, data[:4096])
        walked = WalkedFile(rel, path, len(data), language)
        return Decision(True, f"indexed ({language})", rel, walked)

    def name_reason(self, rel: str, levels: tuple[_IgnoreLevel, ...]) -> str | None:
        name = PurePosixPath(rel).name
        if not self.rules.include_secrets:
            secret = secret_file_reason(rel)
            if secret is not None:
                return f"secret: {secret}; never indexed unless include_secrets is set"
        ignored = self.ignored(rel, levels)
        if ignored is not None:
            return ignored
        if name in LOCK_FILES:
            return "lock file"
        if PurePosixPath(name).suffix.lower() in _CATALOG_SUFFIXES:
            return "translation catalog"
        if _GENERATED_NAME.search(name):
            return "generated file (by its name)"
        if _MINIFIED_NAME.search(name):
            return "minified file (by its name)"
        return None

    def symlink_reason(self, path: Path) -> str:
        try:
            target = path.resolve(strict=True)
        except FileNotFoundError:
            return "broken symlink"
        except (OSError, RuntimeError):  # ELOOP; Python < 3.13 raises RuntimeError
            return "symlink loop"
        real_root = self.root.resolve()
        if not target.is_relative_to(real_root):
            return f"symlink leaves the root (-> {target})"
        return f"symlink to {target.relative_to(real_root).as_posix()} (not followed; targets are walked at their own path)"


def content_reason(rel: str, data: bytes, rules: WalkRules) -> str | None:
    """Why a file with these bytes (at most rules.max_bytes + 1 of them) is not indexed, or None."""
    if len(data) > rules.max_bytes:
        return f"too large (grew past --max-file-kb {_kib(rules.max_bytes, '')} while walking)"
    if b"\0" in data[:BINARY_SNIFF]:
        return "binary (NUL byte in the first 8 KiB)"
    marker = _GENERATED_HEADER.search(data[:2048])
    if marker is not None:
        return f"generated file (header says {marker.group(0).decode('ascii', 'replace')!r})"
    lines = data.count(b"\n") + 1
    if PurePosixPath(rel).suffix.lower() not in _PROSE_SUFFIXES and len(data) >= 2048:
        if len(data) / lines > rules.minified_line_chars:
            return f"minified or machine-written (average line {len(data) // lines} chars)"
    if not rules.include_secrets:
        secret = looks_like_secret(data.decode("utf-8", "replace"), rel)
        if secret is not None:
            return f"secret: {secret}; never indexed unless include_secrets is set"
    return None


def printable_path(rel: str) -> str:
    """`rel` as valid UTF-8: os.scandir hands undecodable bytes over as lone surrogates."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def read_small_text(path: Path, *, follow_symlinks: bool = False) -> str | None:
    """An ignore or git metadata file's text; None if absent, not a regular file (git does not follow
    a symlinked .gitignore either) or larger than IGNORE_FILE_MAX_BYTES (logged, then not used)."""
    try:
        data, _ = read_regular(path, IGNORE_FILE_MAX_BYTES + 1, follow_symlinks=follow_symlinks)
    except (OSError, UnsafeFile):  # absent (the usual case), a symlink, FIFO, directory, or unreadable
        return None
    if len(data) > IGNORE_FILE_MAX_BYTES:
        logger.warning("not reading %s: larger than %d bytes", printable_path(str(path)), IGNORE_FILE_MAX_BYTES)
        return None
    return data.decode("utf-8", "replace")


def _load_level(path: Path, base: str, source: str, *, follow_symlinks: bool = False) -> _IgnoreLevel | None:
    text = read_small_text(path, follow_symlinks=follow_symlinks)
    if text is None:
        return None
    lines = text.splitlines()
    rules = parse_ignore_lines(lines)
    return _IgnoreLevel(base, rules, source) if rules else None


def _repo_context(root: Path, use_ignore_files: bool) -> tuple[Path, str, tuple[_IgnoreLevel, ...]]:
    """(repo top, root's path under it as "" or "a/b/", the levels that apply above the root).

    Lowest precedence first: global excludes, .git/info/exclude, then .gitignore files of the
    directories between the repo top and the root (when indexing a subdirectory of a repo).
    """
    top = next((d for d in (root, *root.parents) if (d / ".git").exists()), root)
    offset = "" if top == root else root.relative_to(top).as_posix() + "/"
    if not use_ignore_files:
        return top, offset, ()
    git_dir = _git_dir(top)
    excludes = _global_excludes_file(git_dir)
    # The user's own global excludes file may be a symlink (dotfile managers); the repo's may not.
    outer = [_load_level(excludes, "", str(excludes), follow_symlinks=True)] if excludes is not None else []
    levels = list(outer)
    if git_dir is not None:
        levels.append(_load_level(git_dir / "info" / "exclude", "", ".git/info/exclude"))
    parts = offset.split("/")[:-1]
    for i in range(len(parts)):
        rel = "/".join(parts[:i])
        base = f"{rel}/" if rel else ""
        for name in IGNORE_FILES:
            levels.append(_load_level(top / rel / name, base, f"{top / rel / name}"))
    found = tuple(level for level in levels if level is not None)
    # The user chose this root: if the enclosing repo ignores it (a vendored checkout, a
    # tool's versions/ dir), index it as a tree of its own rather than as nothing.
    for i in range(1, len(parts) + 1):
        if _deepest_match("/".join(parts[:i]) + "/", found):
            return root, "", tuple(level for level in outer if level is not None)
    return top, offset, found


def _deepest_match(path: str, levels: tuple[_IgnoreLevel, ...]) -> tuple[_IgnoreLevel, IgnoreRule] | None:
    """The (level, rule) excluding `path` (relative to the repo top, dirs end in "/"), or None.

    Git's algorithm: the deepest ignore file with a matching line decides, the last matching line
    within it wins. Only `path` itself is tested, never its parents: the walk prunes excluded
    directories before getting here, which is what makes a file under an excluded directory
    impossible to re-include. (pathspec's GitIgnoreSpec answers for whole file paths, and asked
    about a directory it gets `*` + `!*/` whitelists wrong, hence this small matcher.)
    """
    is_dir = path.endswith("/")
    path = path.rstrip("/")
    name = path.rsplit("/", 1)[-1]
    for level in reversed(levels):
        if not path.startswith(level.base):
            continue
        rel = path[len(level.base) :]
        for rule in reversed(level.rules):
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.fullmatch(name if rule.basename_only else rel):
                return None if rule.negate else (level, rule)
    return None


def parse_ignore_lines(lines: Iterable[str]) -> tuple[IgnoreRule, ...]:
    """Compile gitignore lines; comments, blanks and malformed lines are dropped."""
    rules = []
    for line in lines:
        rule = _parse_ignore_line(line)
        if rule is not None:
            rules.append(rule)
    return tuple(rules)


def _parse_ignore_line(line: str) -> IgnoreRule | None:
    written = line.rstrip("\n\r")
    text = re.sub(r"(?<!\\)\s+$", "", written)  # trailing spaces, unless escaped
    if not text or text.startswith("#"):
        return None
    negate = text.startswith("!")
    if negate or text.startswith("\\!") or text.startswith("\\#"):
        text = text[1:]
    dir_only = text.endswith("/")
    text = text.rstrip("/")
    if not text:
        return None
    basename_only = "/" not in text
    try:
        regex = re.compile(_glob_regex(text.lstrip("/")), re.DOTALL)
    except re.error:
        return None
    return IgnoreRule(written, negate, dir_only, basename_only, regex)


def _glob_regex(glob: str) -> str:
    """gitignore glob -> regex: `*`/`?`/`[...]` stay within a segment; `**` segments cross them."""
    segments = glob.split("/")
    out = ""
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "**":
            out += ".*" if last and i == 0 else "/.*" if last else "(?:.*/)?" if i == 0 else "/(?:.*/)?"
            continue
        if i > 0 and segments[i - 1] != "**":
            out += "/"
        out += _segment_regex(seg)
    return out


def _segment_regex(seg: str) -> str:
    out, i = "", 0
    while i < len(seg):
        c = seg[i]
        i += 1
        if c == "\\" and i < len(seg):
            out += re.escape(seg[i])
            i += 1
        elif c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = i + 1 if seg[i : i + 1] in ("!", "^") else i
            end = seg.find("]", j + 1 if seg[j : j + 1] == "]" else j)  # a leading `]` is literal
            if end < 0:
                out += re.escape(c)
                continue
            body = seg[i:end]
            out += "[" + ("^" + body[1:] if body[:1] in ("!", "^") else body).replace("\\", "\\\\") + "]"
            i = end + 1
        else:
            out += re.escape(c)
    return out


def _git_dir(top: Path) -> Path | None:
    """The git directory; for worktrees and submodules `.git` is a file naming it (info/ is shared)."""
    dot_git = top / ".git"
    if dot_git.is_dir():
        return dot_git
    text = (read_small_text(dot_git) or "").strip()
    if not text.startswith("gitdir:"):
        return None
    git_dir = (top / text.removeprefix("gitdir:").strip()).resolve()
    common = read_small_text(git_dir / "commondir")
    return (git_dir / common.strip()).resolve() if common is not None else git_dir


def _global_excludes_file(git_dir: Path | None) -> Path | None:
    """core.excludesFile from the user's (then the repo's) git config, else git's XDG default."""
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    configs = [Path(xdg) / "git" / "config", Path.home() / ".gitconfig"]
    if git_dir is not None:
        configs.append(git_dir / "config")
    value = None
    for config in configs:  # later files win, as in git
        value = _config_value(config, "core", "excludesfile") or value
    if value:
        return Path(os.path.expanduser(value))
    return Path(xdg) / "git" / "ignore"


def _config_value(path: Path, section: str, key: str) -> str | None:
    """A tiny git-config reader: `[section]` headers, `key = value`, comments; last value wins."""
    text = read_small_text(path, follow_symlinks=True)  # ~/.gitconfig may be a dotfile symlink
    if text is None:
        return None
    current, value = "", None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = line[1 : line.find("]")].strip().split()[0].lower() if "]" in line else ""
            continue
        name, eq, rest = line.partition("=")
        if current == section and eq and name.strip().lower() == key:
            rest = re.split(r"\s[#;]", rest, maxsplit=1)[0].strip()
            value = rest[1:-1] if len(rest) >= 2 and rest[0] == rest[-1] == '"' else rest
    return value


def _kib(n: int, unit: str = " KiB") -> str:
    """Bytes in the unit of --max-file-kb, the option a user changes to let a large file in."""
    return f"{n / 1024:g}{unit}" if n % 1024 == 0 else f"{n / 1024:.1f}{unit}"
