"""Fine-tuning configuration dataclasses, loaded from TOML sections or CLI flags.

Only `DataArgs` lives here so far; model and trainer settings belong next to train.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class HFSource:
    """One Hugging Face dataset streamed with `datasets.load_dataset(path, name, split=split, streaming=True)`;
    each example's `text_field` is one document (needs `datasets` installed and network access)."""

    path: str
    name: str | None = None
    split: str = "train"
    text_field: str = "content"  # The Stack / the-stack-smol field name


@dataclass
class DataArgs:
    """Where documents come from and how they are packed into FoT batches (spec §3.2, §3.3)."""

    # Local directories, globs of directories, or git URLs (cloned with --depth 1 into git_cache_dir).
    sources: list[str] = field(default_factory=list)
    git_cache_dir: str = "~/.cache/longllama-lsp/git"
    hf_datasets: list[HFSource] = field(default_factory=list)
    # Directory-documents with fewer tokens (bos/eos included) are dropped, like the reference TokenFilter.
    min_doc_tokens: int = 2048  # paper Table 6: github subset min 2048 (python subset 4096)
    max_file_bytes: int = 1_000_000  # larger files are generated or data, not code worth learning
    languages: list[str] | None = None  # file suffixes to keep, e.g. [".py", ".ts"]; None = all text files
    dedup: bool = True  # drop files whose content hash was already seen (first in sorted path order wins)
    file_header: str = ""  # prepended to each file in a document, "{path}" = its relative path
    seed: int = 0  # file order inside a directory, document order, train/held-out split
    seq_len: int = 512  # tokens per batch row (T); LongLLaMA used 2048
    batch_size: int = 8  # rows per batch (B), a multiple of pack
    pack: int = 4  # k of doc_aware_k{k}: consecutive rows holding one document stream
    cross_batch_range: int = 3  # R extra contexts per memory-layer query; LongLLaMA-3B used 3
    stepping: bool = True  # pack row j sees a growing range (reference cross_batch_stepping)
    # (step, range) pairs overriding cross_batch_range from that step on, e.g. [(0, 1), (500, 3)].
    d_schedule: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        self.hf_datasets = [h if isinstance(h, HFSource) else HFSource(**h) for h in self.hf_datasets]
        self.d_schedule = sorted((int(s), int(r)) for s, r in self.d_schedule)
        if self.languages is not None:
            self.languages = [x if x.startswith(".") else "." + x for x in self.languages]
        if self.pack < 1 or self.batch_size % self.pack != 0:
            raise ValueError(f"batch_size {self.batch_size} must be a positive multiple of pack {self.pack}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        if self.cross_batch_range < 0 or any(r < 0 for _, r in self.d_schedule):
            raise ValueError("cross-batch ranges must be >= 0")

    def range_at(self, step: int) -> int:
        """Cross-batch range R in force at optimizer step `step`."""
        r = self.cross_batch_range
        for start, value in self.d_schedule:
            if step >= start:
                r = value
        return r

    def crossbatch_at(self, step: int):
        """`CrossBatch` to pass to the model at `step` (imported lazily: data code needs no model)."""
        from longllama_lsp.model.crossbatch import CrossBatch

        return CrossBatch(range=self.range_at(step), pack=self.pack, stepping=self.stepping)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataArgs:
        """From a TOML `[data]` table; unknown keys are an error, not silently ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown [data] keys {unknown}; expected some of {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the run directory's params file (round-trips through from_dict)."""
        d = dataclasses.asdict(self)
        d["d_schedule"] = [list(p) for p in self.d_schedule]
        return d
