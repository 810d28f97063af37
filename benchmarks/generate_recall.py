"""Recall queries answered by `lengen generate`: does a trained model on the synthetic language
give the value last SET for the key asked?

Each query is ``SET k<k> v<v>``, then 2..29 random filler words, then ``GET k<k>`` (so the
binding is well within W = 64); the model's greedy next token is compared with ``v<v>``.
Queries are drawn from a seeded generator, so every architecture gets the same ones. The
generation is :func:`lengen.generate.generate`, the code of ``lengen generate``.

    python benchmarks/generate_recall.py results/<run of the synthetic language>
    python benchmarks/generate_recall.py results/<run> --archs ttt --queries 200
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run folder of the synthetic language")
    ap.add_argument("--archs", help="comma-separated (default: every architecture of the run)")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from lengen.generate import find_record, generate, load_model
    from lengen.plugins import PluginHost
    from lengen.results import RECORD, read_record

    host = PluginHost()
    archs = args.archs.split(",") if args.archs else sorted({r["arch"] for r in map(read_record, args.run.glob(
        f"**/{RECORD}")) if r})
    for arch in archs:
        m = load_model(host, find_record(args.run, arch), device="cpu")
        cfg = m.record["dataset"]["config"]
        keys, values, filler = cfg.get("n_keys", 16), cfg.get("n_values", 32), cfg.get("n_filler", 96)
        rng = random.Random(args.seed)
        right = 0
        for _ in range(args.queries):
            k, v = rng.randrange(keys), rng.randrange(values)
            words = " ".join(f"w{rng.randrange(filler)}" for _ in range(rng.randrange(2, 30)))
            prompt = m.encode(f"SET k{k} v{v} {words} GET k{k}")
            answer = next(generate(m, prompt, 1, temperature=0))
            right += m.decode([answer]) == f"v{v}"
        print(f"{arch}: {right}/{args.queries} recall queries answered right "
              f"(SET k v, 2..29 filler words, GET k; greedy)")


if __name__ == "__main__":
    main()
