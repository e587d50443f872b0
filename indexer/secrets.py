"""Recognise credentials by file name and by content, so they are never indexed or logged.

`looks_like_secret(text)` answers with a reason (never the secret itself); `redact(text)` masks
matches, for the server's logs. Patterns follow the well-known token formats (the same families
gitleaks and GitHub secret scanning look for); the generic `password = "..."` rule also needs a
high-entropy value with letters and digits, so ordinary code like `token = "<your token here>"` passes.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import PurePosixPath

from indexer.languages import SPECS, language_for

# Exact file names that hold credentials.
_SECRET_NAMES = {
    ".env": "environment file (.env)",
    ".netrc": "credential file (.netrc)",
    "_netrc": "credential file (_netrc)",
    ".npmrc": "credential file (.npmrc)",
    ".pypirc": "credential file (.pypirc)",
    ".pgpass": "credential file (.pgpass)",
    ".htpasswd": "credential file (.htpasswd)",
    ".git-credentials": "credential file (.git-credentials)",
    ".dockercfg": "credential file (.dockercfg)",
    "credentials": "credential file",
    "credentials.json": "credential file",
    "id_rsa": "SSH private key",
    "id_dsa": "SSH private key",
    "id_ecdsa": "SSH private key",
    "id_ed25519": "SSH private key",
}
_SECRET_SUFFIXES = {
    ".pem": "certificate/key file (.pem)",
    ".key": "private key file (.key)",
    ".p12": "keystore (.p12)",
    ".pfx": "keystore (.pfx)",
    ".keystore": "keystore",
    ".jks": "keystore (.jks)",
    ".ppk": "PuTTY private key",
    ".kdbx": "password database",
    ".tfvars": "Terraform variables (often secrets)",
    ".tfstate": "Terraform state (holds secrets)",
}

# (what, literal that must occur, pattern): the literal is a cheap `in` test before the regex scan.
_TOKEN_PATTERNS: list[tuple[str, tuple[str, ...], re.Pattern[str]]] = [
    (
        "private key block",
        ("PRIVATE KEY",),
        re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    ),
    ("AWS access key id", ("AKIA", "ASIA"), re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    (
        "GitHub token",
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"),
    ),
    ("Slack token", ("xox",), re.compile(r"\bxox[baprs]-[A-Za-z0-9-]{10,}")),
    ("Google API key", ("AIza",), re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b")),
    ("Stripe secret key", ("k_live_",), re.compile(r"\b[sr]k_live_[0-9A-Za-z]{20,}")),
]
# OpenAI/Anthropic style keys: checked for letters+digits and entropy, since `sk-` starts words too.
_SK_KEY = re.compile(r"(?<![A-Za-z0-9_-])sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}")
# `api_key = "…"`: find long quoted values first (rare), then look left for the name and `=`/`:`.
_LONG_QUOTED = re.compile(r"""["']([^"'\s]{16,})["']""")
_ASSIGNED_BEFORE = re.compile(
    r"""(?i)(?:api[_-]?key|secret|token|passw(?:or)?d|passwd|auth[_-]?key|private[_-]?key)[\w.-]*["']?\s*[:=]\s*$"""
)
_PLACEHOLDER = re.compile(r"(?i)xxxx|your|example|change|dummy|sample|placeholder|<|>|\{|\}|\$|\*{3}")


def secret_file_reason(path: str) -> str | None:
    """Why a file name marks a credential file, or None. `.env.example` counts: safer to skip."""
    p = PurePosixPath(path)
    name, lower = p.name, p.name.lower()
    if lower in _SECRET_NAMES:
        return _SECRET_NAMES[lower]
    if lower.startswith(".env.") or lower.endswith(".env"):
        return f"environment file ({name}; templates like .env.example are skipped too, to be safe)"
    suffix = p.suffix.lower()
    if suffix in _SECRET_SUFFIXES:
        return _SECRET_SUFFIXES[suffix]
    # `secrets.py` is ordinary code (the stdlib has one; its content is still scanned);
    # `secrets.yaml` / `credentials.toml` hold the secrets themselves.
    is_code = language_for(name) in SPECS
    if (lower.startswith("secrets.") or lower.startswith("credentials.")) and not is_code:
        return f"secrets file ({name})"
    if p.parent.name == ".aws" and name in ("config", "credentials"):
        return "AWS credentials"
    return None


def looks_like_secret(text: str) -> str | None:
    """The first credential-looking thing in `text`, described with its line number (not its value)."""
    found = _find(text)
    if found is None:
        return None
    what, start = found
    return f"{what} on line {text.count(chr(10), 0, start) + 1}"


def redact(text: str, mask: str = "[REDACTED]") -> str:
    """`text` with every credential-looking span replaced by `mask` (for logs and error messages)."""
    spans = sorted(_spans(text))
    out, last = [], 0
    for start, end, _ in spans:
        if start >= last:
            out += [text[last:start], mask]
            last = end
    return "".join(out) + text[last:]


def _find(text: str) -> tuple[str, int] | None:
    first = min(_spans(text), default=None)
    return (first[2], first[0]) if first else None


def _spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, what) of every credential-looking value in `text`."""
    spans = []
    for what, literals, pattern in _TOKEN_PATTERNS:
        if any(lit in text for lit in literals):
            spans += [(m.start(), m.end(), what) for m in pattern.finditer(text)]
    if "sk-" in text:
        spans += [
            (m.start(), m.end(), "API key (sk-...)")
            for m in _SK_KEY.finditer(text)
            if _random_looking(m.group(0)[3:])
        ]
    for m in _LONG_QUOTED.finditer(text):
        if _random_looking(m.group(1)) and _ASSIGNED_BEFORE.search(text, max(0, m.start() - 80), m.start()):
            spans.append((m.start(1), m.end(1), "hard-coded credential"))
    return spans


def _random_looking(value: str) -> bool:
    """Letters and digits, no placeholder words, and >= 3.5 bits/char (hex keys ~3.8, words ~3)."""
    if _PLACEHOLDER.search(value):
        return False
    if not (any(c.isdigit() for c in value) and any(c.isalpha() for c in value)):
        return False
    return shannon_entropy(value) >= 3.5


def shannon_entropy(value: str) -> float:
    """Bits per character of `value`'s own character distribution."""
    counts = Counter(value)
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in counts.values()) if n else 0.0
