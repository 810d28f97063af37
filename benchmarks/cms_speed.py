"""Training speed of the nested CMS-LSTM: what the levels and the surprise term cost.

Each variant is trained through lengen's own ``Trainer`` (the harness's optimizer step: one
AdamW per update period, summed gradients, the surprise term from
``Architecture.training_losses``, state carried across windows as the seed trains), on
random tokens of the given vocabulary, all variants interleaved round-robin (a few steps
each per round) so that they share the machine's load. Each row reports the median step
time over all its timed steps after warm-up and its ratio to the baseline
``cms-lstm-flat`` with ``surprise = "off"`` (one timescale, no surprise: a plain LSTM + FFN
model). The acceptance target is ``cms-lstm`` at <= 1.3x the baseline's step time.

    python benchmarks/cms_speed.py                         # CPU preset, batch 32 x 64
    python benchmarks/cms_speed.py --preset seed --batch 64 --length 512 --device cuda   # the seed's recipe
    python benchmarks/cms_speed.py --json

On a GPU at the seed's recipe (preset ``seed``, batch 64 x 512, vocab 283) the steps/s
column compares with the seed's reported 37.6 steps/s on an RTX 4090.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from lengen import allocator
from lengen.api import BuildContext
from lengen.plugins import PluginHost
from lengen.suites import TrainSpec
from lengen.train import Trainer, count_params, make_accelerator

#: (label, registered architecture, config changes): the baseline first
VARIANTS = [
    ("flat, surprise off", "cms-lstm-flat", {"surprise": "off"}),
    ("cms-lstm", "cms-lstm", {}),
    ("levels only (nosurprise)", "cms-lstm-nosurprise", {}),
    ("surprise only (flat)", "cms-lstm-flat", {}),
]


def trainer(name: str, changes: dict, args, tokens: np.ndarray, accelerator, seed: int) -> Trainer:
    entry = PluginHost().architectures.get(name)
    arch = entry.load()
    config = arch.Config(**{**entry.defaults, "preset": args.preset, **changes})
    torch.manual_seed(seed)
    model = arch.build(config, BuildContext(vocab_size=args.vocab, window=args.length))
    spec = TrainSpec(steps=10 ** 6, batch_size=args.batch, lr=3e-4, betas=(0.9, 0.999), weight_decay=0.0,
                     warmup=0, min_lr_ratio=1.0, clip=0.0, state_passing=True, doc_policy="packed")
    t = Trainer(model, arch, config, tokens, spec, window=args.length, seed=seed, accelerator=accelerator,
                label=name)
    t.model.train()
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu", choices=["cpu", "seed"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=283)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    ap.add_argument("--rounds", type=int, default=10, help="round-robin rounds")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    malloc_tuned = allocator.tune()
    torch.set_num_threads(args.threads)
    accelerator, precision = make_accelerator(args.device, "fp32")
    sync = torch.cuda.synchronize if accelerator.device.type == "cuda" else (lambda: None)
    tokens = np.random.default_rng(0).integers(0, args.vocab, 4 * args.batch * (args.length + 1) * 8)
    trainers = []
    for i, (label, name, changes) in enumerate(VARIANTS):
        t = trainer(name, changes, args, tokens, accelerator, seed=i)
        for _ in range(args.warmup):
            t.step()
        sync()
        t.times = []
        trainers.append((label, t))
    for _ in range(args.rounds):
        for _label, t in trainers:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                t.step()
                sync()
                t.times.append(time.perf_counter() - t0)
    base = statistics.median(trainers[0][1].times)
    rows = {}
    for label, t in trainers:
        med = statistics.median(t.times)
        q = statistics.quantiles(t.times, n=4)
        rows[label] = {"params": count_params(t.module), "median_step_s": med, "steps_per_s": 1 / med,
                       "step_s_q1_q3": [q[0], q[2]], "steps": len(t.times), "ratio_to_baseline": med / base,
                       "tokens_per_s": args.batch * args.length / med}
    out = {"config": {"preset": args.preset, "batch": args.batch, "length": args.length, "vocab": args.vocab,
                      "device": str(accelerator.device), "precision": precision, "threads": args.threads,
                      "rounds": args.rounds, "steps_per_round": args.steps, "torch": torch.__version__,
                      "malloc_tuned": malloc_tuned, "machine": platform.processor() or platform.machine()},
           "results": rows}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"train step (lengen's Trainer), preset {args.preset}, batch {args.batch} x L {args.length}, vocab "
          f"{args.vocab}, {accelerator.device}, {args.threads} threads, {args.rounds} rounds x {args.steps} steps, "
          "medians")
    print(f"{'variant':<28}{'params':>10}{'ms/step':>9}{'(q1..q3)':>16}{'steps/s':>9}{'x base':>8}")
    for label, row in rows.items():
        lo, hi = row["step_s_q1_q3"]
        print(f"{label:<28}{row['params'] / 1e6:>9.3f}M{1e3 * row['median_step_s']:>9.1f}"
              f"{f'{1e3 * lo:.1f}..{1e3 * hi:.1f}':>16}{row['steps_per_s']:>9.2f}{row['ratio_to_baseline']:>8.2f}")


if __name__ == "__main__":
    main()
