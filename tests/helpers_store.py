"""Another process holding an index's writer lock, as `longllama watch` or a server does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WRITER = """\
import sys, time
from pathlib import Path
from indexer.pipeline import checkpoint_fingerprint
from indexer.store import Store

store = Store.open(sys.argv[1], checkpoint_fingerprint(Path(sys.argv[2])))  # the writer lock, as `watch` holds it
print("writing", flush=True)
while True:  # and commits, as it does
    store.set_meta("heartbeat", str(time.time()))
    time.sleep(0.01)
"""


def start_writer(db: Path, model: Path) -> subprocess.Popen:
    """A process that holds `db`'s writer lock and commits every 10 ms until killed (it has the lock
    once this returns)."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(model)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if writer.stdout.readline() != "writing\n":
        writer.kill()
        raise AssertionError("the writer process did not start")
    return writer


class Watch:
    """`longllama watch` in a process of its own: the index's writer, as a user runs it beside an editor."""

    def __init__(self, root: Path, model: Path):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "longllama_lsp.cli", "watch", "--repo", str(root), "--model", str(model),
             "--debounce-ms", "50"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    def wait_for(self, prefix: str, timeout: float = 120) -> None:
        """Until watch has printed a line starting with `prefix` (it holds the writer lock from
        'indexing'; 'watching' once the pass is done; 'updated' after each re-index)."""
        deadline = time.monotonic() + timeout
        while not any(line.startswith(prefix) for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"`longllama watch` printed no {prefix!r} line: {''.join(self.lines)}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
