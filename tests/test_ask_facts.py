"""bench/ask_facts.py: the repository Q&A bench's questions (from `ast`, names defined once) and its scoring.

Test Data: a three-file package written to tmp_path: constants (one defined twice), functions and a class.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import ask_facts as A  # noqa: E402

FILES = {
    "pkg/__init__.py": "VERSION = '1.2.3'\n",
    "pkg/net.py": "POOL_SIZE = 10\nTIMEOUT = 2.5\nFLAG = True\nLIMIT = 1\n\n\ndef fetch(url, retries=3):\n    pass\n\n\n"
                  "class Client:\n    def get(self):\n        pass\n\n    def _retry(self):\n        pass\n\n"
                  "    async def close(self):\n        pass\n\n\nclass Empty:\n    pass\n",
    "pkg/util.py": "LIMIT = 2\n\n\ndef _hidden(a, b):\n    pass\n\n\ndef join_all(parts, sep, *, strict):\n    pass\n",
}


def test_questions_name_what_one_file_defines(tmp_path):
    for rel, text in FILES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    qs = {(q["kind"], q["name"]): q for q in A.questions(tmp_path, 10, random.Random(0))}
    assert {n for k, n in qs if k == "value"} == {"VERSION", "POOL_SIZE", "TIMEOUT"}  # not a bool, 1 char, twice
    assert qs[("value", "TIMEOUT")]["answer"] == "2.5" and qs[("value", "VERSION")]["answer"] == "1.2.3"
    assert {n for k, n in qs if k == "file"} == {"fetch", "Client", "Empty", "join_all"}  # not private
    assert qs[("file", "join_all")]["answer"] == "util.py"
    assert {n: q["answer"] for (k, n), q in qs.items() if k == "params"} == {"fetch": ["url", "retries"],
                                                                           "join_all": ["parts", "sep", "strict"]}
    assert {n: q["answer"] for (k, n), q in qs.items() if k == "methods"} == {"Client": ["get", "close"]}  # public
    modules = {n: q for (k, n), q in qs.items() if k == "module"}  # util.py: one public name; __init__: none
    assert list(modules) == ["net"] and sorted(modules["net"]["answer"]) == ["Client", "Empty", "fetch"]
    assert modules["net"]["question"] == "What does the net module define?"


def test_a_methods_answer_is_right_with_half_of_them_and_at_least_two():
    two, five = {"kind": "methods", "answer": ["get", "close"]}, {"kind": "methods", "answer": list("abcde")}
    assert A.right(two, "`get()` and `close()`") and not A.right(two, "get_all and close")
    assert A.right(five, "a, b and c") and not A.right(five, "a and b")
    module = {"kind": "module", "answer": ["fetch", "Client", "Empty"]}
    assert A.right(module, "It defines `fetch` and the Client class.") and not A.right(module, "fetch, fetch")


def test_an_answer_is_right_only_with_the_whole_value_name_or_parameters():
    value, file, params = {"kind": "value", "answer": "10"}, {"kind": "file", "answer": "net.py"}, \
        {"kind": "params", "answer": ["url", "retries"]}
    assert A.right(value, "POOL_SIZE is 10.") and not A.right(value, "It is 100.") and not A.right(value, "1.10")
    assert A.right(file, "in pkg/net.py") and A.right(file, "the net module") and not A.right(file, "in network.py")
    assert A.right(params, "url and retries") and not A.right(params, "url and retry_count")
