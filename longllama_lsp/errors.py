"""The few user-facing errors. Each message says what went wrong and what to do about it."""

from pathlib import Path


class LongLlamaError(Exception):
    """Base class for errors shown to users (CLI prints the message, the server shows it)."""


class ModelError(LongLlamaError):
    """No usable model: not found, not installed, or cannot be converted."""


class CheckpointError(ModelError):
    """A checkpoint exists but is wrong: missing keys, wrong shapes, unknown type, unsafe pickle."""


class StoreError(LongLlamaError):
    """The index database cannot be opened, written or trusted."""


class StoreMismatch(StoreError):
    """The index was built by a different model (fingerprint mismatch)."""


class StoreOutdated(StoreError):
    """The index was written by an older version (migrations pending) and is open read-only."""


class IndexBusy(StoreError):
    """Another process (PID `holder`, as its lock file says) holds the writer lock of the index at `path`."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"index {path} is being written by another process (PID {holder}); "
                         "wait for it to finish or stop it (if it is `longllama watch`, it keeps this "
                         "index current: nothing to do)")
        self.path, self.holder = path, holder
