"""Training throughput, MFU and peak memory of `sw` and `ttt` at 125M through lengen's own
training step (the Trainer: AdamW, clipping, the suite's precision, accelerate), on a GPU.

    python benchmarks/gpu_throughput.py                          # sw and ttt, preset 125m, bf16
    python benchmarks/gpu_throughput.py --compile                # also through torch.compile
    python benchmarks/gpu_throughput.py --device cpu --preset tiny --steps 6   # a dry run on CPU

Each architecture trains ``--steps`` optimizer steps on random tokens (batch ``--batch`` x
``--window``); the first ``--warmup`` are not timed; the table gives the median tokens/s, the
peak memory (``torch.cuda.max_memory_allocated``) and the MFU:

    MFU = tokens/s x training FLOPs per token / the device's peak dense bf16 FLOP/s,

with training FLOPs per token = 3 x forward FLOPs per token (backward = 2 x forward), the
forward counted by ``torch.utils.flop_counter.FlopCounterMode`` on one sequence of the window
(matrix multiplies and attention, 2 FLOPs per multiply-add; the TTT layer's torch code runs on
GPUs, so the counter sees all of it). The peak is looked up from the device name (H100 / H200
989 TFLOP/s, A100 312, L4 121, RTX 4090 165) or given with ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from lengen.api import BuildContext
from lengen.measure import flops_per_token
from lengen.plugins import PluginHost
from lengen.suites import TrainSpec
from lengen.train import Trainer, count_params, make_accelerator

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L4": 121.0, "4090": 165.2}
SIZES = {"125m": {"ttt": {"preset": "125m"}, "sw": {"d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 2048}},
         "tiny": {"ttt": {"preset": "tiny"}, "sw": {}}}


def peak_tflops(device) -> float | None:
    if getattr(device, "type", "cpu") != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def measure(host, name: str, args, accelerator, precision: str) -> dict:
    arch = host.architectures.load(name)
    config = arch.Config(**SIZES[args.preset][name.split("-")[0]])
    torch.manual_seed(0)
    model = arch.build(config, BuildContext(vocab_size=args.vocab, window=args.window))
    params = count_params(model)
    fwd = flops_per_token(model.to(accelerator.device), arch, args.window, args.vocab, accelerator.device,
                          chunk=args.window if arch.stateful else None)
    model.train()
    spec = TrainSpec(steps=args.steps, batch_size=args.batch, lr=3e-4, warmup=0, precision=precision,
                     compile=args.compile)
    tokens = np.random.default_rng(0).integers(0, args.vocab, args.batch * args.window * (args.steps + 2) + 1)
    trainer = Trainer(model, arch, config, tokens, spec, window=args.window, seed=0, accelerator=accelerator,
                      label=name)
    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    tok_s = args.batch * args.window / statistics.median(times)
    peak = peak_tflops(accelerator.device) if args.peak_tflops is None else args.peak_tflops
    return {"arch": name, "params": params, "precision": precision, "compile": args.compile,
            "tokens_per_s": tok_s, "step_ms": 1e3 * statistics.median(times), "fwd_flops_per_token": fwd,
            "train_flops_per_token": 3 * fwd, "mfu": 3 * fwd * tok_s / (peak * 1e12) if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "timed_steps": len(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="sw,ttt")
    p.add_argument("--preset", default="125m", choices=sorted(SIZES))
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="train through torch.compile")
    p.add_argument("--peak-tflops", type=float, help="the device's peak dense FLOP/s in TFLOP/s (for MFU)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    args.warmup = min(args.warmup, args.steps - 1)
    accelerator, precision = make_accelerator(args.device, args.precision)
    host = PluginHost()
    rows = [measure(host, name, args, accelerator, precision) for name in args.archs.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'arch':<6} {'params':>8} {'prec':>5} {'tok/s':>10} {'ms/step':>8} {'train GFLOP/tok':>15} "
          f"{'MFU':>6} {'peak GiB':>8}  device")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(f"{r['arch']:<6} {r['params'] / 1e6:>7.1f}M {r['precision']:>5} {r['tokens_per_s']:>10,.0f} "
              f"{r['step_ms']:>8.1f} {r['train_flops_per_token'] / 1e9:>15.3f} {mfu:>6} {mem:>8}  {r['device']}")


if __name__ == "__main__":
    main()
