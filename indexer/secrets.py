"""Recognise credentials by file name and by content, so they are never indexed or logged.

Content rules are a maintained rule set rather than our own regexes: the plugins of Yelp's
detect-secrets (https://github.com/Yelp/detect-secrets; AWS, GitHub, GitLab, Slack, Stripe, SendGrid,
JWT, private keys, URLs with a password, `password = ...` keywords, high-entropy base64 strings, ...)
with its own false-positive filters (templated values, `$VAR`, indirect references, UUIDs, ids),
plus a few rules from gitleaks' published config for formats detect-secrets 1.5 lacks
(https://github.com/gitleaks/gitleaks/blob/master/config/gitleaks.toml: huggingface-access-token,
npm-access-token, gcp-api-key, github-fine-grained-pat, anthropic-api-key). `scan(text, path)` names
the rule that matched and the line (never the secret); `redact(text)` masks every match, for logs.

detect-secrets' own scanner runs every plugin on every line (0.04 MB/s on the stdlib here); we first
find each rule's candidate lines by its literal keywords (gitleaks' approach; str.find at C speed),
then run that rule's plugin and the filters on those lines only (~2.5 MB/s; RELIABILITY.md).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from detect_secrets import __version__ as detect_secrets_version
from detect_secrets.core.potential_secret import PotentialSecret
from detect_secrets.filters import heuristic
from detect_secrets.plugins.base import BasePlugin, RegexBasedDetector
from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString
from detect_secrets.plugins.keyword import KeywordDetector
from detect_secrets.util.code_snippet import get_code_snippet
from detect_secrets.util.filetype import FileType, determine_file_type

from indexer.languages import SPECS, language_for

# In the index's content-rules fingerprint (pipeline.CONTENT_RULES): an upgraded detector may flag what
# the last one let through, so every stored file is checked again once. Our own rules (the gitleaks
# restatements, secret file names, keywords) live in this file: its digest counts as part of the version.
DETECTOR_VERSION = (f"detect-secrets {detect_secrets_version.VERSION}; rules "
                    f"{hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]}")

# Exact file names that hold credentials.
_SECRET_NAMES = {
    ".env": "environment file (.env)",
    ".envrc": "environment file (.envrc, direnv)",
    ".netrc": "credential file (.netrc)",
    "_netrc": "credential file (_netrc)",
    ".npmrc": "credential file (.npmrc)",
    ".yarnrc.yml": "credential file (.yarnrc.yml, npmAuthToken)",
    ".pypirc": "credential file (.pypirc)",
    ".pgpass": "credential file (.pgpass)",
    ".my.cnf": "credential file (.my.cnf)",
    ".htpasswd": "credential file (.htpasswd)",
    ".git-credentials": "credential file (.git-credentials)",
    ".dockercfg": "credential file (.dockercfg)",
    ".vault-token": "credential file (.vault-token)",
    ".s3cfg": "credential file (.s3cfg)",
    ".boto": "credential file (.boto)",
    "kubeconfig": "Kubernetes credentials (kubeconfig)",
    "application_default_credentials.json": "Google Cloud credentials",
    "credentials": "credential file",
    "credentials.json": "credential file",
    "id_rsa": "SSH private key",
    "id_dsa": "SSH private key",
    "id_ecdsa": "SSH private key",
    "id_ed25519": "SSH private key",
}
# (parent directory, file name): credentials only in that place.
_SECRET_PLACES = {
    (".aws", "config"): "AWS credentials",
    (".aws", "credentials"): "AWS credentials",
    (".kube", "config"): "Kubernetes credentials (.kube/config)",
    (".docker", "config.json"): "Docker registry credentials (.docker/config.json)",
    (".azure", "accessTokens.json"): "Azure credentials",
    (".gcloud", "credentials.db"): "Google Cloud credentials",
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
_SECRET_NAME_ENDINGS = {
    ".tfstate.backup": "Terraform state backup (holds secrets)",
    ".tfvars.json": "Terraform variables (often secrets)",
}


def secret_file_reason(path: str) -> str | None:
    """Why a file name marks a credential file, or None. `.env.example` counts: safer to skip."""
    p = PurePosixPath(path)
    name, lower = p.name, p.name.lower()
    if lower in _SECRET_NAMES:
        return _SECRET_NAMES[lower]
    if (p.parent.name, name) in _SECRET_PLACES:
        return _SECRET_PLACES[(p.parent.name, name)]
    if lower.startswith(".env.") or lower.endswith(".env"):
        return f"environment file ({name}; templates like .env.example are skipped too, to be safe)"
    for ending, reason in _SECRET_NAME_ENDINGS.items():
        if lower.endswith(ending):
            return reason
    suffix = p.suffix.lower()
    if suffix in _SECRET_SUFFIXES:
        return _SECRET_SUFFIXES[suffix]
    # `secrets.py` is ordinary code (the stdlib has one; its content is still scanned);
    # `secrets.yaml` / `credentials.toml` hold the secrets themselves.
    is_code = language_for(name) in SPECS
    if (lower.startswith("secrets.") or lower.startswith("credentials.")) and not is_code:
        return f"secrets file ({name})"
    return None


# -- content ---------------------------------------------------------------------------------------

class _GitleaksRule(RegexBasedDetector):
    """A gitleaks rule run as a detect-secrets plugin (same filters, same reporting)."""

    secret_type = "gitleaks"
    denylist: list[re.Pattern[str]] = []


def _gitleaks(rule_id: str, pattern: str) -> type[RegexBasedDetector]:
    return type(rule_id, (_GitleaksRule,), {"secret_type": f"gitleaks {rule_id}",
                                            "denylist": [re.compile(pattern)]})


# Restated from gitleaks' config (ids kept), simplified to Python `re`: RE2's mid-pattern `(?i)` and
# gitleaks' delimiter groups become `\b` and explicit classes; the hf_ rule accepts digits too.
GITLEAKS_RULES = (
    _gitleaks("huggingface-access-token", r"\bhf_[A-Za-z0-9]{34,}\b"),
    _gitleaks("npm-access-token", r"\bnpm_[A-Za-z0-9]{36}\b"),
    _gitleaks("gcp-api-key", r"\bAIza[\w-]{35}\b"),
    _gitleaks("github-fine-grained-pat", r"\bgithub_pat_\w{82}\b"),
    _gitleaks("anthropic-api-key", r"\bsk-ant-(?:api03|admin01)-[\w-]{93}AA\b"),
)
# detect-secrets plugins left out: public IP addresses are not credentials; hex strings of high
# entropy are mostly digests and test vectors in code (sha256 constants, commit ids); Artifactory's
# `AP[0-9A-F]` + 8 letters matches ordinary identifiers.
_LEFT_OUT = {"IPPublicDetector", "HexHighEntropyString", "ArtifactoryDetector"}
# Lowercase literals that every match of a rule contains (gitleaks' `keywords`): one fast
# case-insensitive scan for all of them picks the lines worth running the plugins on. A plugin
# missing here (a newer detect-secrets) has its own regexes run over the whole text instead.
_CREDENTIAL_WORDS = ("key", "pwd", "pw", "pass", "token", "secret", "contrase")
_KEYWORDS: dict[str, tuple[str, ...]] = {
    "AWSKeyDetector": ("akia", "asia", "abia", "acca", "a3t", "aws"),
    "AzureStorageKeyDetector": ("accountkey",),
    "BasicAuthDetector": ("://",),
    "CloudantDetector": ("cloudant", *_CREDENTIAL_WORDS),
    "GitHubTokenDetector": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
    "GitLabTokenDetector": ("glpat-", "gldt-", "glft-", "glsoat-", "glrt-", "gr1348941", "glcbt-", "glimt-",
                            "glptt-", "glagent-", "gloas-"),
    "IbmCloudIamDetector": _CREDENTIAL_WORDS,
    "IbmCosHmacDetector": _CREDENTIAL_WORDS,
    "JwtTokenDetector": ("eyj",),
    "KeywordDetector": _CREDENTIAL_WORDS,
    "MailchimpDetector": ("-us",),
    "NpmDetector": ("_authtoken",),
    "OpenAIDetector": ("t3blbkfj",),
    "PrivateKeyDetector": ("private key", "putty-user-key"),
    "PypiTokenDetector": ("pypi-",),
    "SendGridDetector": ("sg.",),
    "SlackDetector": ("xox", "hooks.slack.com"),
    "SoftlayerDetector": ("softlayer", *_CREDENTIAL_WORDS),
    "SquareOAuthDetector": ("sq0csp-",),
    "StripeDetector": ("k_live_",),
    "huggingface-access-token": ("hf_",),
    "npm-access-token": ("npm_",),
    "gcp-api-key": ("aiza",),
    "github-fine-grained-pat": ("github_pat_",),
    "anthropic-api-key": ("sk-ant-",),
}
_PROSE = frozenset({".md", ".markdown", ".rst", ".txt", ".adoc", ".org", ".tex", ".html"})
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-./+=]*")  # how far a masked match extends to the right
_WORD_CHARS = re.compile(r"[A-Za-z0-9_]*")  # ... and to the left (not past `KEY=` or `req-`)
_QUOTED = re.compile(r"""(["'])[A-Za-z0-9+/=_-]{20,}\1""")  # what the base64 entropy plugin can flag


@dataclass(frozen=True)
class Finding:
    rule: str  # e.g. "AWS Access Key (detect-secrets AWSKeyDetector)"
    line: int  # 1-based
    value: str  # the matched secret: for redaction only, never shown

    def __str__(self) -> str:
        return f"{self.rule} on line {self.line}"


@functools.cache
def _plugins() -> tuple[BasePlugin, ...]:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    classes = [c for c in get_mapping_from_secret_type_to_class().values() if c.__name__ not in _LEFT_OUT]
    generic = [c for c in classes if c in (KeywordDetector, Base64HighEntropyString)]
    # Token formats first: a line that matches one and a generic rule is reported by the format's name.
    return tuple(c() for c in (*[c for c in classes if c not in generic], *GITLEAKS_RULES, *generic))


def _candidate_lines(plugin: BasePlugin, text: str, lower: str, newlines: list[int]) -> set[int]:
    """0-based numbers of the lines where `plugin` could match (a superset of its findings)."""
    name = type(plugin).__name__
    if name in _KEYWORDS:
        starts = [i for word in _KEYWORDS[name] for i in _find_all(lower, word)]
    else:
        patterns = (_QUOTED,) if isinstance(plugin, Base64HighEntropyString) else getattr(plugin, "denylist", ())
        starts = [m.start() for p in patterns for m in re.finditer(p.pattern, text, p.flags | re.MULTILINE)]
    return {bisect.bisect_right(newlines, i) for i in starts}


def _find_all(haystack: str, needle: str) -> Iterator[int]:
    i = haystack.find(needle)
    while i >= 0:
        yield i
        i = haystack.find(needle, i + 1)


def _rule_name(plugin: BasePlugin) -> str:
    if isinstance(plugin, _GitleaksRule):
        return plugin.secret_type
    return f"{plugin.secret_type} (detect-secrets {type(plugin).__name__})"


def _as_filename(path: str) -> str:
    """The name detect-secrets' keyword rules see: extension-less and shell-like files (.envrc,
    Dockerfile, *.sh) get the config rules, where `KEY=value` needs no quotes; code and prose keep theirs."""
    name = PurePosixPath(path).name
    if determine_file_type(name) is not FileType.OTHER:
        return name
    if language_for(name) in SPECS or PurePosixPath(name).suffix.lower() in _PROSE:
        return name
    return f"{name}.cfg"


def _filtered(secret: PotentialSecret, plugin: BasePlugin, line: str) -> bool:
    """detect-secrets' default heuristic filters (its Settings.filters), applied by hand, plus: a
    keyword's value that is short or repetitive (`password = "x"` in a test) is a placeholder."""
    value = secret.secret_value or ""
    if isinstance(plugin, KeywordDetector) and (len(value) < 6 or _entropy(value) < 2.5):
        return True
    return (heuristic.is_sequential_string(value) or heuristic.is_potential_uuid(value)
            or heuristic.is_likely_id_string(value, line, plugin) or heuristic.is_templated_secret(value)
            or heuristic.is_prefixed_with_dollar_sign(value) or heuristic.is_indirect_reference(line)
            or heuristic.is_not_alphanumeric_string(value))


def _entropy(value: str) -> float:
    """Bits per character of `value`'s own character distribution."""
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values()) if n else 0.0


def scan(text: str, path: str = "") -> list[Finding]:
    """Every credential found in `text` (from file `path`, which picks the keyword rules), in order."""
    lower, newlines = text.lower(), list(_find_all(text, "\n"))
    todo: dict[int, list[BasePlugin]] = {}  # line -> the plugins to run on it
    for plugin in _plugins():
        for i in _candidate_lines(plugin, text, lower, newlines):
            todo.setdefault(i, []).append(plugin)
    if not todo:
        return []
    lines, filename, findings = text.split("\n"), _as_filename(path or "adhoc.txt"), []
    for i in sorted(todo):
        line = lines[i].rstrip()
        context = get_code_snippet(lines, i + 1)
        for plugin in todo[i]:
            for secret in plugin.analyze_line(filename=filename, line=line, line_number=i + 1, context=context):
                if not _filtered(secret, plugin, line):
                    findings.append(Finding(_rule_name(plugin), i + 1, secret.secret_value or ""))
    return findings


def looks_like_secret(text: str, path: str = "") -> str | None:
    """The first credential-looking thing in `text`: its rule and line number (not its value)."""
    found = scan(text, path)
    return str(found[0]) if found else None


def redact(text: str, mask: str = "[REDACTED]") -> str:
    """`text` with every credential-looking token replaced by `mask` (for logs and error messages).

    Scanned with the config-file rules (`password=x` needs no quotes), and each match widened to the
    whole token around it: a rule may report only part of a token (GitLab's, the `glpat` prefix).
    """
    findings = scan(text, "log.cfg")
    if not findings:
        return text
    lines = text.split("\n")
    for n in sorted({f.line for f in findings}):
        line, spans = lines[n - 1], []
        for value in {f.value for f in findings if f.line == n and f.value}:
            for m in re.finditer(re.escape(value), line):
                start = m.start() - len(_left_token(line[:m.start()]))
                spans.append((start, m.end() + len(_TOKEN_CHARS.match(line, m.end())[0])))
        lines[n - 1] = _mask(line, spans, mask)
    return "\n".join(lines)


def _left_token(before: str) -> str:
    """The token characters that end `before` (a match may start mid-token)."""
    return _WORD_CHARS.match(before[::-1])[0][::-1]


def _mask(line: str, spans: list[tuple[int, int]], mask: str) -> str:
    out, last = [], 0
    for start, end in sorted(spans):
        if start >= last:
            out += [line[last:start], mask]
            last = end
        else:
            last = max(last, end)
    return "".join(out) + line[last:]
