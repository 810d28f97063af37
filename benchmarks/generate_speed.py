"""Generation speed of `lengen generate`: tokens/s at 1k and 16k generated tokens, and whether
the time per token stays flat as the text grows.

Each architecture is built at the size a suite gives it (default: ``tiny``, W = 64), with
random weights (speed does not depend on them) or, with ``--run``, a recorded run's, and
generates through :mod:`lengen.generate` (one token per forward with the state carried,
sampling at temperature 1 from a seeded generator; no detokenization): the code of
``lengen generate``. Two measurements per architecture:

- **whole generations**: tokens/s of generating 1,024 and 16,384 tokens from the first token
  of an evaluation document (``--lengths``), repeated ``--rounds`` times, interleaved;
- **paired bursts**: one generation is forked (its state cloned) after 1,024 and after 16,384
  tokens; then bursts of ``--burst`` tokens are generated from each fork in turn,
  ``--bursts`` times, so that both are timed under the same machine load. The ratio of the
  median time per token at 16k to that at 1k is the flatness figure (an O(W)-state model:
  1.0; target: within 1.3).

    python benchmarks/generate_speed.py                         # sw and ttt
    python benchmarks/generate_speed.py --archs sw --rounds 1 --lengths 1024,4096
    python benchmarks/generate_speed.py --threads 1 --json
    python benchmarks/generate_speed.py --run results/<run>     # the recorded weights
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


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


def whole(m, n: int, seed: int) -> float:
    """Tokens/s of generating ``n`` tokens from a fresh stream."""
    from lengen.generate import generate

    t0 = time.perf_counter()
    for _tok in generate(m, [m.start_token], n, seed=seed):
        pass
    return n / (time.perf_counter() - t0)


def forks(m, at: list[int]) -> dict:
    """The stream of one generation, forked after each number of generated tokens in ``at``."""
    from lengen.generate import Stream, generate

    stream = Stream(m)
    out, done = {}, 0
    for n in sorted(at):
        for tok in generate(m, [m.start_token] if done == 0 else [last], n - done, seed=n, stream=stream):
            last = tok
        done = n
        out[n] = (stream.copy(), last)
    return out


def burst(m, fork, n: int, seed: int) -> float:
    """Microseconds per token of ``n`` more tokens from a copy of ``fork``."""
    from lengen.generate import generate

    stream, last = fork
    stream = stream.copy()
    t0 = time.perf_counter()
    for _tok in generate(m, [last], n, seed=seed, stream=stream):
        pass
    return 1e6 * (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="sw,ttt")
    ap.add_argument("--lengths", default="1024,16384", help="generated tokens, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="whole generations of each length")
    ap.add_argument("--burst", type=int, default=256, help="tokens per paired burst")
    ap.add_argument("--bursts", type=int, default=15, help="paired bursts at each length")
    ap.add_argument("--benchmark", default="tiny")
    ap.add_argument("--run", type=Path, help="a run folder: generate with its recorded weights")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from lengen import allocator
    from lengen.plugins import PluginHost

    if args.threads:
        torch.set_num_threads(args.threads)
    allocator.tune()
    host = PluginHost()
    archs = [a for a in args.archs.split(",") if a]
    lengths = [int(x) for x in args.lengths.split(",") if x]
    models = {a: build(host, a, args.benchmark, args.run) for a in archs}
    load = [os.getloadavg()[0]]
    for m in models.values():  # warm-up: kernels loaded, allocator primed
        whole(m, 64, seed=0)
    tps: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for a in archs:
            for n in lengths:
                tps.setdefault((a, n), []).append(whole(models[a], n, seed=r))
        load.append(os.getloadavg()[0])
    us: dict[tuple[str, int], list[float]] = {}
    for a in archs:
        fk = forks(models[a], lengths)
        for b in range(args.bursts):
            for n in lengths:
                us.setdefault((a, n), []).append(burst(models[a], fk[n], args.burst, seed=b))
        load.append(os.getloadavg()[0])
    rows = []
    for a in archs:
        for n in lengths:
            row = {"arch": a, "tokens": n, "tokens_per_s": statistics.median(tps[(a, n)]),
                   "tokens_per_s_runs": [round(x, 1) for x in tps[(a, n)]],
                   "burst_us_per_token": statistics.median(us[(a, n)]),
                   "burst_us_per_token_q": [round(q, 1) for q in statistics.quantiles(us[(a, n)], n=4)]}
            first = next((r for r in rows if r["arch"] == a), row)  # the first length of this architecture
            row["time_per_token_vs_first"] = first["tokens_per_s"] / row["tokens_per_s"]
            row["burst_vs_first"] = row["burst_us_per_token"] / first["burst_us_per_token"]
            rows.append(row)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "load_average_1min": [round(x, 2) for x in load],
            "date": time.strftime("%Y-%m-%d %H:%M"), "benchmark": args.benchmark,
            "weights": str(args.run) if args.run else "random", "burst": args.burst, "bursts": args.bursts}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return
    print(f"generation, {args.benchmark} sizes, {meta['weights']} weights, CPU, {meta['threads']} threads; "
          f"whole: median of {args.rounds}; bursts: median of {args.bursts} x {args.burst} tokens; "
          f"load average {min(load):.2f}..{max(load):.2f}")
    print(f"{'arch':<6} {'tokens':>7} {'tokens/s':>9} {'vs 1st':>7} {'burst us/tok':>13} {'q1..q3':>15} {'vs 1st':>7}  "
          "whole runs (tokens/s)")
    for r in rows:
        q = r["burst_us_per_token_q"]
        print(f"{r['arch']:<6} {r['tokens']:>7,} {r['tokens_per_s']:>9,.0f} {r['time_per_token_vs_first']:>6.2f}x "
              f"{r['burst_us_per_token']:>13.0f} {q[0]:>7.0f}..{q[2]:<6.0f} {r['burst_vs_first']:>6.2f}x  "
              f"{', '.join(f'{x:,.0f}' for x in r['tokens_per_s_runs'])}")


if __name__ == "__main__":
    main()
