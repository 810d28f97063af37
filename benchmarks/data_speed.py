"""Data pipeline speed: WikiText-2 (valid + test, 2.4 MB) through the ``text`` dataset with a
byte-level BPE trained on the training split (valid.txt).

* cold: an empty cache folder every repeat, so each load reads and splits the files, trains
  the BPE, encodes both splits, measures train/eval overlap and writes the cache;
* warm: the cache present, so each load hashes the files and reads the cached arrays (no
  tokenization; the script checks ``corpus.info["cache"] == "hit"``).

Imports and a first warm-up load happen before timing. Medians over the repeats are
printed with the targets (cold under 5 s, warm under 1 s).

    python benchmarks/data_speed.py                        # ../shared/data/wikitext-2
    python benchmarks/data_speed.py --repeats 7 --vocab-size 4096 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from lengen.api import DataContext
from lengen_text.datasets import TextFiles

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
TARGETS = {"cold": 5.0, "warm": 1.0}


def load(data_dir: Path, cache_dir: Path, vocab_size: int):
    ds = TextFiles()
    cfg = ds.Config(train="valid.txt", eval="test.txt", documents="wikitext")
    ctx = DataContext(seed=0, window=64, eval_length=1280, eval_sequences=64, train_tokens=0,
                      cache_dir=cache_dir, data_dir=data_dir,
                      tokenizer={"kind": "bpe", "vocab_size": vocab_size})
    t0 = time.perf_counter()
    corpus = ds.load(cfg, ctx)
    return time.perf_counter() - t0, corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder with valid.txt and test.txt")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    if not (args.data_dir / "valid.txt").is_file():
        raise SystemExit(f"no valid.txt under {args.data_dir}; pass --data-dir (the WikiText-2 folder)")

    root = Path(tempfile.mkdtemp(prefix="lengen-data-speed-"))
    try:
        load(args.data_dir, root / "warmup", args.vocab_size)  # imports, page cache
        cold, breakdown = [], []
        for i in range(args.repeats):
            s, corpus = load(args.data_dir, root / f"cold{i}", args.vocab_size)
            assert corpus.info["cache"] == "miss"
            cold.append(s)
            breakdown.append(corpus.info["build_s"])
        warm = []
        for _ in range(args.repeats):
            s, corpus = load(args.data_dir, root / "cold0", args.vocab_size)
            assert corpus.info["cache"] == "hit", "the warm load tokenized"
            warm.append(s)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    mb = sum(corpus.info["bytes"].values()) / 1e6
    tokens = sum(corpus.info["tokens"].values())
    result = {
        "data_mb": round(mb, 3), "tokens": tokens, "vocab_size": corpus.vocab_size, "repeats": args.repeats,
        "cold_median_s": round(statistics.median(cold), 3), "warm_median_s": round(statistics.median(warm), 4),
        "cold_s": [round(x, 3) for x in cold], "warm_s": [round(x, 4) for x in warm],
        "cold_breakdown_median_s": {k: round(statistics.median(b[k] for b in breakdown), 3) for k in breakdown[0]},
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    result["pass"] = result["cold_median_s"] < TARGETS["cold"] and result["warm_median_s"] < TARGETS["warm"]
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"WikiText-2 valid+test: {mb:.2f} MB -> {tokens:,} tokens, byte-level BPE {corpus.vocab_size} "
          f"({os.cpu_count()} CPUs, load average {result['load_average'][0]})")
    print(f"  cold (empty cache, BPE trained): median {result['cold_median_s']:.2f} s  "
          f"(target < {TARGETS['cold']:g} s)  runs {result['cold_s']}")
    print("      of which " + ", ".join(f"{k} {v:.2f} s" for k, v in result["cold_breakdown_median_s"].items()))
    print(f"  warm (cached, no tokenization):  median {result['warm_median_s']:.3f} s  "
          f"(target < {TARGETS['warm']:g} s)  runs {result['warm_s']}")
    print("  PASS" if result["pass"] else "  FAIL: a target was missed")


if __name__ == "__main__":
    main()
