"""Token-healing probe: complete 12 random indented lines of requests/sessions.py with and without
healing (default model, no memory), and count empty answers, leading spaces and exact lines.

    python bench/heal_check.py [--source requests/sessions.py from an unpacked requests 2.32.3 wheel]
"""

import argparse
import random
import re
from pathlib import Path

from longllama_lsp.engine import Engine, EngineOptions

STATEMENT = re.compile(r"^ {4,}[a-z_]\w* ?=|^ {4,}return |^ {4,}if ")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="/work/data/eval/requests/requests/sessions.py")
    p.add_argument("--lines", type=int, default=12)
    args = p.parse_args()
    lines = Path(args.source).read_text().split("\n")
    picks = random.Random(1).sample([i for i, line in enumerate(lines) if STATEMENT.match(line)], args.lines)
    eng = Engine.load(None, options=EngineOptions(max_tokens=24, memory=False, typeahead=False))
    eng.wait_ready()
    healing = eng._heal
    for mode in ("healed", "plain"):
        eng._heal = healing if mode == "healed" else (lambda ids, line_prefix: (ids, ""))
        empty = lead = exact = 0
        for i in picks:
            indent = len(lines[i]) - len(lines[i].lstrip())
            text = "\n".join(lines[:i] + [lines[i][:indent]] + lines[i + 1:])
            offset = len("\n".join(lines[:i])) + 1 + indent
            got = eng.complete(text, offset, path="/x/" + Path(args.source).name, memory=False, key=(mode, i)).text
            empty += not got.strip()
            lead += got[:1].isspace()
            exact += got.strip() == lines[i].strip()
            print(mode, i + 1, repr(lines[i].strip()[:40]), "->", repr(got[:40]))
        print(f"== {mode}: empty {empty}/{len(picks)}, leading space {lead}/{len(picks)}, exact {exact}/{len(picks)}")
    eng.close()


if __name__ == "__main__":
    main()
