"""How much of adaptive TTT's compute the inner loop is, analytically, at several sizes.

Forward matrix-multiply FLOPs per token (2 per multiply-add) of ``adaptive-ttt`` at L tokens
(every mini-batch after the first reads an update), from the same formulas
``AdaptiveTTT.flops_per_token`` uses (checked against FlopCounterMode in the tests): the
inner loop's read and steps, everything else, the share of the inner loop at fixed-1 and
fixed-4, what a 30/40/30 mix of {1, 2, 4} saves against fixed-4 at best (the mean k, with
no signal cost), and what an entropy probe through the head would add if its logits were
not the model's predictions anyway.

    python benchmarks/adaptive_flops.py
    python benchmarks/adaptive_flops.py --length 1280 --json
"""

from __future__ import annotations

import argparse
import json

from lengen_ttt.adaptive import AdaptiveTTTConfig, adaptive_inner_flops
from lengen_ttt.model import rest_flops

SIZES = {  # name: (config, vocabulary)
    "tiny (adaptive-cpu)": ({"preset": "tiny"}, 4096),
    "adaptive-wikitext2 (GPU suite)": ({"d_model": 512, "n_layers": 6, "n_heads": 8, "d_ff": 1536}, 50257),
    "125m": ({"preset": "125m"}, 50257),
    "125m, TTT-MLP": ({"preset": "125m", "inner": "mlp"}, 50257),
}


def split(cfg: AdaptiveTTTConfig, vocab: int, k: float, length: int) -> dict:
    f = adaptive_inner_flops(cfg)
    n = cfg.size()["n_layers"]
    updates = -(-length // cfg.mini_batch) - 1  # the first mini-batch reads the initial weights
    read = n * f["read"]
    steps = n * updates * (f["first"] + (k - 1) * f["extra"]) / length
    return {"inner": read + steps, "rest": float(rest_flops(cfg, vocab)), "total": read + steps + rest_flops(cfg, vocab)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=1280)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    mix_k = 0.3 * 1 + 0.4 * 2 + 0.3 * 4
    rows = {}
    for name, (kw, vocab) in SIZES.items():
        cfg = AdaptiveTTTConfig(**kw)
        one, four, mix = (split(cfg, vocab, k, args.length) for k in (1, 4, mix_k))
        D = cfg.size()["d_model"]
        rows[name] = {"total_fixed1_M": one["total"] / 1e6, "total_fixed4_M": four["total"] / 1e6,
                      "inner_share_fixed1": one["inner"] / one["total"],
                      "inner_share_fixed4": four["inner"] / four["total"],
                      "fixed4_over_fixed1": four["total"] / one["total"] - 1,
                      "mix_saving_vs_fixed4": 1 - mix["total"] / four["total"],
                      "head_probe_over_fixed4": 2 * D * vocab / four["total"]}
    if args.json:
        print(json.dumps({"length": args.length, "mix_mean_k": mix_k, "rows": rows}, indent=1))
        return
    print(f"forward matmul FLOPs per token at L = {args.length}; mix 30/40/30 of k in {{1, 2, 4}} (mean k {mix_k:g})")
    print(f"{'size':<32}{'fixed-1 M':>10}{'fixed-4 M':>10}{'inner@1':>9}{'inner@4':>9}{'4 vs 1':>8}"
          f"{'mix saves':>10}{'head probe':>11}")
    for name, r in rows.items():
        print(f"{name:<32}{r['total_fixed1_M']:>10.2f}{r['total_fixed4_M']:>10.2f}{100 * r['inner_share_fixed1']:>8.1f}%"
              f"{100 * r['inner_share_fixed4']:>8.1f}%{100 * r['fixed4_over_fixed1']:>7.1f}%"
              f"{100 * r['mix_saving_vs_fixed4']:>9.1f}%{100 * r['head_probe_over_fixed4']:>10.1f}%")


if __name__ == "__main__":
    main()
