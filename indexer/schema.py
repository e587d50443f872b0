"""What the index database holds: row types, the numbered migrations, and the memory blob layout.

One SQLite file per (repository, model). Tables:

    meta      key/value: fingerprint (digest), fingerprint_details (JSON), schema_version, created_at,
              db_id and owner_mac (this user's MAC of db_id: the database was written on this machine)
    files     path PK; whole-file content hash, size, mtime_ns, language, decode policy,
              status ('indexed' | 'skipped') and skip_reason, indexed_at
    chunks    id PK; path -> files(path) ON DELETE CASCADE; ordinal (unique per path); byte and
              1-based inclusive line ranges; symbol, kind, token_count, content_hash (sha256 of the text),
              memory_key (what its memory is encoded from: the text and the text before it, see below)
    memories  memory_key PK; fingerprint, n_tokens, dtype, shape, layers, nbytes, mask, data, mac
              (mac: keyed BLAKE2b of the row under this user's key, indexer.signing), encoding
              ('raw' | 'int8-rows', see below)

Memories are keyed by memory key (the whole file belongs to one model fingerprint, and each row
repeats it): a chunk's memory is encoded after the end of the text before it in its file (at most
`Fingerprint.context_chars`, indexer.encoder.memory_key), so the key hashes that context and the
chunk's content hash; a chunk with no context (the first of a file, or context_chars 0) has its content
hash as key. Identical text after identical context, anywhere in the repository or on another branch,
is encoded once. A chunk row may exist before its memory: the pipeline encodes what is missing.

Memory blob layout (`data`), native little-endian, no header, by `encoding`:

    raw        for layer in layers (ascending):  keys (Hkv, T, D) then values (Hkv, T, D), C-contiguous,
               in `dtype` (every row before migration 3; kept and read as they are, see m003)
    int8-rows  for layer in layers (ascending):  keys q (Hkv, T, D) int8, keys scale (Hkv, T) float16,
               then values q, values scale: indexer.quant's rows, dequantised on load into `dtype`
               (52% of bfloat16's bytes at D = 64; perplexity with memory +0.01%, BENCHMARKS.md)

`mask` is the float32 (T,) additive mask, or NULL when every slot is visible (the usual case).
Blobs go last in the row so metadata queries never read overflow pages.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sqlite_utils import Database, Migrations

if TYPE_CHECKING:  # torch (and the model package, which imports transformers) load only to (de)code
    import torch  # tensors: `longllama status` reads an index in a second instead of half a minute

    from longllama_lsp.model.memory import Memory

MEM_DTYPES = ("float32", "float16", "bfloat16")  # torch dtype names

migrations = Migrations("longllama-index")


@migrations()
def m001_create_tables(db: Database) -> None:
    for sql in (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE files (
            path TEXT PRIMARY KEY,
            content_hash TEXT,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            language TEXT,
            decode TEXT,
            status TEXT NOT NULL CHECK (status IN ('indexed', 'skipped')),
            skip_reason TEXT,
            indexed_at REAL NOT NULL)""",
        """CREATE TABLE chunks (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL REFERENCES files(path) ON DELETE CASCADE,
            ordinal INTEGER NOT NULL,
            start_byte INTEGER NOT NULL,
            end_byte INTEGER NOT NULL,
            start_line INTEGER NOT NULL,
            end_line INTEGER NOT NULL,
            symbol TEXT,
            kind TEXT,
            token_count INTEGER NOT NULL,
            content_hash TEXT NOT NULL,
            UNIQUE (path, ordinal))""",
        "CREATE INDEX chunks_content_hash ON chunks (content_hash)",
        """CREATE TABLE memories (
            content_hash TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL,
            n_tokens INTEGER NOT NULL,
            dtype TEXT NOT NULL,
            shape TEXT NOT NULL,
            layers TEXT NOT NULL,
            nbytes INTEGER NOT NULL,
            created_at REAL NOT NULL,
            mask BLOB,
            data BLOB NOT NULL)""",
    ):
        db.execute(sql)


@migrations()
def m002_memory_mac(db: Database) -> None:
    """Each memory row's MAC under the user's key (indexer.signing): rows without one are not trusted."""
    db.execute("ALTER TABLE memories ADD COLUMN mac BLOB")


@migrations()
def m003_memory_encoding(db: Database) -> None:
    """int8 rows with float16 scales (indexer.quant) for new memories. Old rows stay 'raw' and are read
    as they are: they are exact, their MACs stay valid, and rewriting a 500 MB index on open would hold
    the writer lock for minutes; `longllama index --rebuild` shrinks an old index when one wants it."""
    db.execute("ALTER TABLE memories ADD COLUMN encoding TEXT NOT NULL DEFAULT 'raw'")


@migrations()
def m004_memory_key(db: Database) -> None:
    """Memories keyed by what they were encoded from (text and the context before it), not the text
    alone. Rows written before were encoded without context: their key is their content hash."""
    db.execute("ALTER TABLE chunks ADD COLUMN memory_key TEXT")
    db.execute("UPDATE chunks SET memory_key = content_hash")
    db.execute("CREATE INDEX chunks_memory_key ON chunks (memory_key)")
    db.execute("ALTER TABLE memories RENAME COLUMN content_hash TO memory_key")


ENCODINGS = ("raw", "int8-rows")
STORE_ENCODING = "int8-rows"  # what new memories are written as

SCHEMA_VERSION = len(migrations._migrations)

# Characters of the file before a chunk that its memory is encoded after (indexer.encoder): ~300 tokens of
# code, the 256 tokens measured in bench/xid_encoding.py. Here, not in the encoder, so that `longllama status`
# knows the current value without importing torch.
CONTEXT_CHARS = 1024


@dataclass(frozen=True)
class Fingerprint:
    """Everything that determines a chunk's memory bytes (house style 20). Equal digest = reusable cache."""

    config_hash: str
    weights_hash: str
    tokenizer_hash: str
    mem_dtype: str  # one of MEM_DTYPES
    mem_layers: tuple[int, ...]
    kv_heads: int
    head_dim: int
    # Memory keys are raw k_proj outputs, i.e. rotated as if at position 0 (spec §2.2.6).
    key_layout: str = "unrotated"
    # Characters of the file before a chunk that its memory is encoded after (indexer.encoder); 0:
    # each chunk alone, as every index before this field (left out of the digest then, so those stay valid).
    context_chars: int = 0

    def __post_init__(self):
        if self.mem_dtype not in MEM_DTYPES:
            raise ValueError(f"mem_dtype must be one of {list(MEM_DTYPES)}, got {self.mem_dtype!r}")
        object.__setattr__(self, "mem_layers", tuple(sorted(int(i) for i in self.mem_layers)))

    @classmethod
    def from_details(cls, details: dict[str, Any], kv_heads: int, head_dim: int, context_chars: int = 0
                     ) -> Fingerprint:
        """From `longllama_lsp.model.loading.fingerprint_details(path)` plus the model's KV shape."""
        if not details.get("mem_layers") or details.get("mem_dtype") not in MEM_DTYPES:
            raise ValueError(f"model has no memory layers to index (mem_layers={details.get('mem_layers')}, "
                             f"mem_dtype={details.get('mem_dtype')})")
        return cls(config_hash=details["config_sha256"],
                   weights_hash=_json_sha256({"weights": details["weights"],
                                              "adapter": details.get("adapter")}),
                   tokenizer_hash=_json_sha256(details["tokenizer"]), mem_dtype=details["mem_dtype"],
                   mem_layers=tuple(details["mem_layers"]), kv_heads=kv_heads, head_dim=head_dim,
                   context_chars=context_chars)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.mem_dtype)

    def to_json(self) -> str:
        fields = asdict(self)
        if not self.context_chars:
            del fields["context_chars"]
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        return cls(**json.loads(text))


def _json_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class FileRow:
    """One repository file as indexed (or skipped, with the reason)."""

    path: str  # repository-relative, '/'-separated
    content_hash: str | None  # sha256 hex of the file bytes
    size: int
    mtime_ns: int
    language: str | None = None
    decode: str | None = None  # how bytes became text, e.g. 'utf-8' or 'utf-8-replace'
    status: str = "indexed"  # 'indexed' | 'skipped'
    skip_reason: str | None = None  # e.g. 'binary', 'too large', 'generated'
    indexed_at: float = field(default=0.0, compare=False)  # set by the store


@dataclass(frozen=True)
class ChunkRow:
    """A stored chunk: where it is and what content (hash) its memory is."""

    id: int
    path: str
    ordinal: int
    start_byte: int
    end_byte: int
    start_line: int  # 1-based, inclusive
    end_line: int  # 1-based, inclusive
    symbol: str | None
    kind: str | None
    token_count: int
    content_hash: str  # sha256 hex of the chunk's text
    memory_key: str  # what its memory was encoded from: the text and the context before it (encoder.memory_key)


CHUNK_INPUT_FIELDS = ("start_byte", "end_byte", "start_line", "end_line", "symbol", "kind",
                      "token_count", "content_hash", "memory_key")


def encode_memory(memory: Memory, fp: Fingerprint, encoding: str = STORE_ENCODING
                  ) -> tuple[dict, bytes | None, bytes]:
    """Validate `memory` against the model fingerprint and lay it out as (row fields, mask, data)."""
    import torch

    if encoding not in ENCODINGS:
        raise ValueError(f"memory encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
    if list(memory) != list(fp.mem_layers):
        raise ValueError(f"memory layers {list(memory)} != model mem_layers {list(fp.mem_layers)}")
    t = memory.num_tokens
    if t == 0:
        raise ValueError("refusing to store an empty memory (0 tokens)")
    expected = (1, fp.kv_heads, t, fp.head_dim)
    parts, mask = [], None
    for layer, cache in memory.items():
        for name, x in (("keys", cache.keys), ("values", cache.values)):
            if tuple(x.shape) != expected or x.dtype != fp.torch_dtype:
                raise ValueError(f"layer {layer} {name}: got {tuple(x.shape)} {x.dtype}, "
                                 f"expected {expected} {fp.torch_dtype}")
            parts.extend(_blob_parts(x.detach().to("cpu"), encoding))
        m = cache.mask.detach().reshape(-1).to("cpu", torch.float32)
        if mask is None:
            mask = m
        elif not torch.equal(m, mask):
            raise ValueError(f"layer {layer} mask differs from layer {fp.mem_layers[0]}'s")
    data = b"".join(parts)  # raw: (2 L Hkv T D itemsize,) bytes; int8-rows: (2 L Hkv T (D + 2),)
    mask_blob = mask.numpy().tobytes() if bool((mask != 0).any()) else None
    row = dict(n_tokens=t, dtype=fp.mem_dtype, shape=json.dumps([fp.kv_heads, t, fp.head_dim]),
               layers=json.dumps(list(fp.mem_layers)), nbytes=len(data), encoding=encoding)
    return row, mask_blob, data


def _blob_parts(x: torch.Tensor, encoding: str) -> list[memoryview]:
    """One (1, Hkv, T, D) tensor's bytes: itself (raw), or its int8 rows then their float16 scales."""
    import torch

    from indexer.quant import quantize_rows

    # Raw bytes through numpy (which has no bfloat16, hence the uint8 view); bytes.join is the one
    # copy and, unlike torch.cat, does not stall when other processes hog the CPU threads.
    tensors = [x] if encoding == "raw" else list(quantize_rows(x))  # q (1, Hkv, T, D), scale (1, Hkv, T, 1)
    return [memoryview(y.contiguous().view(torch.uint8).numpy()).cast("B") for y in tensors]


def decode_memory(dtype: str, shape: str, layers: str, mask: bytes | None, data: bytes,
                  encoding: str = "raw") -> Memory:
    """Inverse of encode_memory. raw: one copy (bytes -> bytearray), the tensors are views of it;
    int8-rows: dequantised into `dtype` (indexer.quant.dequantize_rows, the reference itself)."""
    import torch

    from longllama_lsp.model.memory import MemCache, Memory

    h, t, d = json.loads(shape)
    layer_ids = json.loads(layers)
    if dtype not in MEM_DTYPES:
        raise ValueError(f"memory dtype {dtype!r} is not one of {MEM_DTYPES}")
    if encoding not in ENCODINGS:
        raise ValueError(f"memory encoding {encoding!r} is not one of {ENCODINGS}")
    tdtype = getattr(torch, dtype)
    if encoding == "int8-rows":
        return _decode_int8_rows(tdtype, h, t, d, layer_ids, _mask_tensor(mask, t), data)
    n = h * t * d
    itemsize = torch.empty((), dtype=tdtype).element_size()
    if len(data) != 2 * len(layer_ids) * n * itemsize:
        raise ValueError(f"memory blob has {len(data)} bytes, expected {2 * len(layer_ids) * n * itemsize}")
    flat = torch.frombuffer(bytearray(data), dtype=tdtype)  # bytearray: writable, no warning
    m = _mask_tensor(mask, t)
    out = {}
    for i, layer in enumerate(layer_ids):
        k = flat[2 * i * n:(2 * i + 1) * n].view(1, h, t, d)  # (1, Hkv, T, D)
        v = flat[(2 * i + 1) * n:(2 * i + 2) * n].view(1, h, t, d)
        out[layer] = MemCache(k, v, m)
    return Memory(out)


def _mask_tensor(mask: bytes | None, t: int) -> torch.Tensor:
    """The (1, 1, T, 1) float32 additive mask a row stores (NULL: all visible)."""
    import torch

    if mask is None:
        return torch.zeros(1, 1, t, 1, dtype=torch.float32)
    if len(mask) != 4 * t:
        raise ValueError(f"memory mask has {len(mask)} bytes, expected {4 * t}")
    return torch.frombuffer(bytearray(mask), dtype=torch.float32).view(1, 1, t, 1)


def _decode_int8_rows(tdtype: torch.dtype, h: int, t: int, d: int, layer_ids: list[int], m: torch.Tensor,
                      data: bytes) -> Memory:
    import torch

    from indexer.quant import dequantize_rows
    from longllama_lsp.model.memory import MemCache, Memory

    n_q, n_s = h * t * d, 2 * h * t  # bytes of one tensor's int8 rows and of its float16 scales
    if len(data) != 2 * len(layer_ids) * (n_q + n_s):
        raise ValueError(f"memory blob has {len(data)} bytes, expected {2 * len(layer_ids) * (n_q + n_s)}")
    buf = bytearray(data)  # one copy: writable, no warning

    def tensor(i: int) -> torch.Tensor:  # the i-th stored tensor: 0 = layer 0 keys, 1 = its values, ...
        at = i * (n_q + n_s)
        q = torch.frombuffer(buf, dtype=torch.int8, offset=at, count=n_q).view(1, h, t, d)
        scale = torch.frombuffer(buf, dtype=torch.float16, offset=at + n_q, count=h * t).view(1, h, t, 1)
        return dequantize_rows(q, scale, tdtype)  # (1, Hkv, T, D)

    return Memory({layer: MemCache(tensor(2 * i), tensor(2 * i + 1), m) for i, layer in enumerate(layer_ids)})
