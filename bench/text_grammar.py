"""Cost of the text front end: compiling upstream's Chinese grammar once vs loading it from the cache, and the
time to normalise a text.

    python bench/text_grammar.py          # builds into a temporary cache (about 1.5 min, 7 GB), then loads it

Each phase runs in its own child process so its peak memory (ru_maxrss) is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from rollouts.text import TextFrontEnd, load_zh_normalizer
t = time.perf_counter()
load_zh_normalizer()
zh = time.perf_counter() - t
fe = TextFrontEnd()
fe.normalize("hello 1")  # loads the English grammar
texts = [l.split("\t", 1)[1] for l in open(sys.argv[2], encoding="utf-8") if "\t" in l]
t = time.perf_counter()
for x in texts:
    fe.normalize(x)
per_text = (time.perf_counter() - t) / len(texts)
print(json.dumps({"zh_grammar_s": zh, "per_text_ms": 1000 * per_text, "texts": len(texts),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def phase(cache: str) -> dict:
    env = dict(os.environ, TTSRL_CACHE=cache)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO), str(REPO / "configs/data/tiny/sentences.txt")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        build = phase(cache)
        build["wall_s"] = time.perf_counter() - t
        t = time.perf_counter()
        load = phase(cache)
        load["wall_s"] = time.perf_counter() - t
    print(f"first run (compile): zh grammar {build['zh_grammar_s']:.1f} s, peak memory {build['peak_rss_gb']:.1f} GB")
    print(
        f"cached run (load):   zh grammar {load['zh_grammar_s']:.1f} s, peak memory {load['peak_rss_gb']:.1f} GB, "
        f"process {load['wall_s']:.1f} s"
    )
    print(f"normalising: {load['per_text_ms']:.0f} ms per text ({load['texts']} tiny-data sentences, zh + en)")


if __name__ == "__main__":
    main()
