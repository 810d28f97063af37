"""Generation speed of `lengen generate`: tokens/s at 1k and 16k generated tokens.

Each architecture is built at the size a suite gives it (default: ``tiny``, W = 64), with
random weights (speed does not depend on them) or, with ``--run``, a recorded run's, and
generates through :func:`lengen.generate.generate`: the code path of ``lengen generate``
(one token per forward, the state carried; sampling at temperature 1 from a seeded
generator; no detokenization). For each length it reports tokens/s over the whole generation
and the time per token over its last 1,024 tokens; a per-token cost flat in the length is
what an O(W)-state model should show (the last 1,024 of 16k within 1.3x of the first 1k).
Architectures and lengths are interleaved, ``--rounds`` times; medians are reported.

    python benchmarks/generate_speed.py                       # sw and ttt, 1k and 16k tokens, 3 rounds
    python benchmarks/generate_speed.py --archs sw --lengths 1024,4096 --rounds 1
    python benchmarks/generate_speed.py --run results/<run>   # the recorded weights
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

TAIL = 1024


def build(host, arch: str, benchmark: str, run: Path | None):
    """A :class:`lengen.generate.Loaded` for ``arch``: the recorded model of ``run``, or the
    suite's size with random weights."""
    import torch

    from lengen.api import BuildContext
    from lengen.generate import Loaded, find_record, load_model
    from lengen.plan import RunRequest, plan_run

    if run is not None:
        return load_model(host, find_record(run, arch), device="cpu")
    plan = plan_run(host, RunRequest(benchmark=benchmark, archs=[arch], check=False), check_results=False)
    comp = plan.archs[0]
    corpus = plan.dataset.obj.load(plan.dataset.config, plan.data_ctx)
    torch.manual_seed(0)
    model = comp.obj.build(comp.config, BuildContext(vocab_size=corpus.vocab_size, window=plan.suite.window)).eval()
    return Loaded({"arch": arch}, comp.obj, model, plan.suite.window, corpus.vocab_size, corpus.encode,
                  corpus.decode, int(corpus.eval.tokens[0]))


def measure(m, n: int, seed: int) -> dict:
    from lengen.generate import generate, timed

    times = [t for _tok, t in timed(generate(m, [m.start_token], n, seed=seed))]
    tail = min(TAIL, n)
    return {"tokens": n, "seconds": times[-1], "tokens_per_s": n / times[-1],
            "tail_us_per_token": 1e6 * (times[-1] - times[-1 - tail]) / tail if n > tail else
            1e6 * times[-1] / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="sw,ttt")
    ap.add_argument("--lengths", default="1024,16384", help="generated tokens, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--benchmark", default="tiny")
    ap.add_argument("--run", type=Path, help="a run folder: generate with its recorded weights")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from lengen import allocator
    from lengen.plugins import PluginHost

    allocator.tune()
    host = PluginHost()
    archs = [a for a in args.archs.split(",") if a]
    lengths = [int(x) for x in args.lengths.split(",") if x]
    models = {a: build(host, a, args.benchmark, args.run) for a in archs}
    for m in models.values():  # warm-up: kernels loaded, allocator primed
        measure(m, 64, seed=0)
    results: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        for a in archs:
            for n in lengths:
                results.setdefault((a, n), []).append(measure(models[a], n, seed=r))
    rows = []
    for a in archs:
        first = None
        for n in lengths:
            runs = results[(a, n)]
            row = {"arch": a, "tokens": n, "rounds": len(runs),
                   "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs),
                   "tokens_per_s_runs": [round(x["tokens_per_s"], 1) for x in runs],
                   "us_per_token": 1e6 / statistics.median(x["tokens_per_s"] for x in runs),
                   "tail_us_per_token": statistics.median(x["tail_us_per_token"] for x in runs)}
            first = first or row
            row["time_per_token_vs_first"] = first["tokens_per_s"] / row["tokens_per_s"]
            row["tail_vs_first"] = row["tail_us_per_token"] / first["us_per_token"]
            rows.append(row)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "benchmark": args.benchmark, "weights": str(args.run) if args.run else "random"}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return
    print(f"generation, {args.benchmark} sizes, {meta['weights']} weights, CPU ({meta['threads']} threads), "
          f"medians of {args.rounds} rounds; load average {meta['load_average'][0]:.2f}")
    print(f"{'arch':<6} {'tokens':>7} {'tokens/s':>9} {'us/token':>9} {'vs 1st':>7} {'last 1k us/tok':>15} "
          f"{'vs 1st':>7}  runs (tokens/s)")
    for r in rows:
        print(f"{r['arch']:<6} {r['tokens']:>7,} {r['tokens_per_s']:>9,.0f} {r['us_per_token']:>9.0f} "
              f"{r['time_per_token_vs_first']:>6.2f}x {r['tail_us_per_token']:>15.0f} {r['tail_vs_first']:>6.2f}x  "
              f"{', '.join(f'{x:,.0f}' for x in r['tokens_per_s_runs'])}")


if __name__ == "__main__":
    main()
