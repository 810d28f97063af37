"""Training throughput of TTT-Linear, TTT-MLP, sliding-window attention and a plain SDPA
transformer, measured together so that their ratios share the same machine load.

Every model: hidden 256, 4 layers, 4 heads, FFN 1024, vocab 4096, tied embedding; batch 8
x L = 64 random tokens; fp32; one training step = forward, cross-entropy, backward, AdamW
step (lengen's ``adamw``: fused where torch has it). ``sw`` is built through its plugin with
window = L (plain causal attention); ``sdpa`` is written here as the yardstick, the usual way
(RMSNorm, RoPE, causal F.scaled_dot_product_attention, SwiGLU).
The architectures are interleaved round-robin (a few steps each per round) and each row
reports the median step time over all its timed steps after warm-up, and the median number of
minor page faults the process took during a step (memory the allocator had to get anew).

    python benchmarks/train_speed.py                  # the table
    python benchmarks/train_speed.py --rounds 20 --json
    python benchmarks/train_speed.py --eval-lengths 64,256,1024,4096   # also: forward cost per token vs L
    python benchmarks/train_speed.py --archs ttt-mlp --profile 10      # torch.profiler table of 10 steps
    python benchmarks/train_speed.py --archs ttt-linear,adaptive-ttt,sw  # any registered architecture

``--eval-lengths`` adds a second table: evaluation (no_grad, batch 1, one call over L tokens)
microseconds per token at each length, interleaved the same way: flat in L for TTT and for
sw at window 64 (O(L x W)), rising for the dense SDPA yardstick (O(L^2)).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from lengen import allocator
from lengen.api import BuildContext, as_output
from lengen.nn import RMSNorm, SwiGLU, init_weights
from lengen.plugins import PluginHost
from lengen.train import count_params
from lengen.train import adamw

SIZE = dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SDPABlock(nn.Module):
    def __init__(self, d, heads, ff):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.mlp = SwiGLU(d, ff)

    def forward(self, x, cos, sin):
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.norm2(x))


class SDPALM(nn.Module):
    """The yardstick: a plain causal transformer written the usual way (LLaMA-style: RMSNorm,
    RoPE with rotate_half, causal SDPA, SwiGLU), the same sizes and block recipe as ``sw``.
    ``sw`` at L = W must train at least as fast: its window machinery must cost nothing there."""

    def __init__(self, vocab, d_model, n_layers, n_heads, d_ff):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(SDPABlock(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.embed.weight
        hd = d_model // n_heads
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd), persistent=False)
        init_weights(self)

    def forward(self, ids, state=None):
        angles = torch.arange(ids.shape[1], device=ids.device).float()[:, None] * self.inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x)), None


def build(name: str, vocab: int, length: int, extra: dict):
    if name == "sdpa":
        return SDPALM(vocab, **SIZE)
    entry = PluginHost().architectures.get(name)
    arch = entry.load()
    cfg = dict(entry.defaults)
    cfg.update(SIZE)
    if name == "sw":
        cfg["window"] = length
    else:
        cfg.update(extra)
    return arch.build(arch.Config(**cfg), BuildContext(vocab_size=vocab, window=length))


class Runner:
    def __init__(self, name, model, vocab, batch, length, seed):
        self.name, self.model = name, model.train()
        self.opt = adamw(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)  # as lengen trains
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (16, batch, length + 1), generator=g)
        self.i = 0
        self.times: list[float] = []
        self.faults: list[int] = []  # minor page faults of the process during each timed step
        self.params = count_params(model)

    def step(self, record: bool):
        batch = self.data[self.i % len(self.data)]
        self.i += 1
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        logits = as_output(self.model(batch[:, :-1])).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
            self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)


def eval_cost(names, args, extra, repeats: int = 5) -> dict:
    """Median microseconds per token of a batch-1 forward over L tokens, per arch and L
    (sw keeps window = the training length, so longer inputs use its sliding window)."""
    lengths = [int(v) for v in args.eval_lengths.split(",")]
    models = {n: build(n, args.vocab, args.length, extra).eval() for n in names}
    times = {n: {L: [] for L in lengths} for n in names}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for L in lengths:
            ids = torch.randint(0, args.vocab, (1, L), generator=gen)
            for m in models.values():
                m(ids)  # warm-up at this length
            for _ in range(repeats):
                for n, m in models.items():
                    t0 = time.perf_counter()
                    m(ids)
                    times[n][L].append(time.perf_counter() - t0)
    return {n: {L: 1e6 * statistics.median(ts) / L for L, ts in row.items()} for n, row in times.items()}


def profile(runners, steps: int, rows: int = 25):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for r in runners:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                r.step(record=False)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:rows]
        print(f"\n{r.name}: {steps} steps, ms per step (self = excluding the ops it calls), calls per step")
        print(f"{'op':<60}{'self':>9}{'total':>9}{'calls':>7}")
        for e in events:
            print(f"{e.key[:59]:<60}{e.self_cpu_time_total / 1e3 / steps:>9.2f}"
                  f"{e.cpu_time_total / 1e3 / steps:>9.2f}{e.count / steps:>7.0f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="ttt-linear,ttt-mlp,sw,sdpa")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per architecture")
    ap.add_argument("--rounds", type=int, default=10, help="round-robin rounds")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per architecture per round")
    ap.add_argument("--ttt", default="{}", help="extra TTT config as JSON, e.g. '{\"pre_conv\": true}'")
    ap.add_argument("--eval-lengths", default="", help="comma-separated L: also time batch-1 evaluation per token")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="keep glibc's allocator defaults (lengen run tunes them: lengen/allocator.py)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="instead of the table: torch.profiler over STEPS steps of each arch after warm-up, "
                         "ops by total self time (ms per step)")
    args = ap.parse_args(argv)
    malloc_tuned = False if args.no_malloc_tuning else allocator.tune()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = args.archs.split(",")
    runners = []
    for i, name in enumerate(names):
        t0 = time.perf_counter()
        r = Runner(name, build(name, args.vocab, args.length, json.loads(args.ttt)), args.vocab, args.batch,
                   args.length, i)
        for _ in range(args.warmup):
            r.step(record=False)
        r.warmup_s = time.perf_counter() - t0
        runners.append(r)
    if args.profile:
        profile(runners, args.profile)
        return
    for _ in range(args.rounds):
        for r in runners:
            for _ in range(args.steps):
                r.step(record=True)
    tokens = args.batch * args.length
    rows = {}
    for r in runners:
        med = statistics.median(r.times)
        q = statistics.quantiles(r.times, n=4) if len(r.times) > 1 else [med, med, med]
        rows[r.name] = {"params": r.params, "median_step_s": med, "tokens_per_s": tokens / med,
                        "tokens_per_s_q1_q3": [tokens / q[2], tokens / q[0]], "steps": len(r.times),
                        "page_faults_per_step": statistics.median(r.faults),
                        "build_and_warmup_s": r.warmup_s}
    eval_rows = eval_cost(names, args, json.loads(args.ttt)) if args.eval_lengths else None
    ref = rows.get("sw", {}).get("tokens_per_s")
    for row in rows.values():
        row["ratio_to_sw"] = row["tokens_per_s"] / ref if ref else None
    out = {"config": {**SIZE, "vocab": args.vocab, "batch": args.batch, "length": args.length,
                      "threads": args.threads, "rounds": args.rounds, "steps_per_round": args.steps,
                      "warmup": args.warmup, "ttt_extra": json.loads(args.ttt), "torch": torch.__version__,
                      "malloc_tuned": malloc_tuned,
                      "machine": platform.processor() or platform.machine()},
           "results": rows}
    if eval_rows is not None:
        out["eval_us_per_token"] = eval_rows
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"train step, batch {args.batch} x L {args.length}, fp32, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} steps, medians, allocator "
          f"{'tuned' if malloc_tuned else 'defaults'}")
    print(f"{'arch':<12}{'params':>10}{'tokens/s':>10}{'(q1..q3)':>18}{'x sw':>7}{'warm s':>8}{'faults':>8}")
    for name, row in rows.items():
        lo, hi = row["tokens_per_s_q1_q3"]
        ratio = f"{row['ratio_to_sw']:.2f}" if row["ratio_to_sw"] is not None else "-"
        print(f"{name:<12}{row['params'] / 1e6:>9.2f}M{row['tokens_per_s']:>10.0f}{f'{lo:.0f}..{hi:.0f}':>18}"
              f"{ratio:>7}{row['build_and_warmup_s']:>8.1f}{row['page_faults_per_step']:>8.0f}")
    if eval_rows is not None:
        lengths = list(next(iter(eval_rows.values())))
        print(f"\nevaluation, batch 1, one forward over L tokens (no_grad): microseconds per token, medians")
        print(f"{'arch':<12}" + "".join(f"{'L=' + str(L):>10}" for L in lengths))
        for name, row in eval_rows.items():
            print(f"{name:<12}" + "".join(f"{row[L]:>10.1f}" for L in lengths))


if __name__ == "__main__":
    main()
