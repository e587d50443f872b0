"""Another process holding an index's writer lock, as `longllama watch` or a server does."""

from __future__ import annotations

import os
import subprocess
import sys
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
