"""How far each level of a trained CMS-LSTM moved from its initialisation, against Adam's bound.

Adam is invariant to the scale of its gradient: each update moves a weight by about the
learning rate at most (|m_hat / sqrt(v_hat)| <= ~1, whatever the gradient's size). So summing
a slow level's gradients over its period does not make its steps larger, and a level updated
every n steps at lr / n can move a weight by at most sum over its updates of lr_t / n: for
the seed's recipe (constant lr 3e-4, 50k steps) level 3 (n = 256, 195 updates) moves at most
195 x 3e-4 / 256 = 2.3e-4 per weight, against an initial weight scale of ~0.05.

For each cms-lstm record of the given runs, the weights are compared with the initialisation
rebuilt under the record's seed (``accelerate.utils.set_seed(seed)`` then ``build``, as
``lengen run`` does), level by level: mean and max |w - w0| of its matrices, the matrices'
initial standard deviation, and the bound from the suite's lr schedule (Adam's steps only:
weight decay adds lr x wd x |w| per update).

``--surprise`` also measures the trained model's surprise targets dL/dy1 and dL/dy2 on the
first ``64 x 513`` tokens of the run's evaluation text (read from the ``text`` datasets'
cache, ``$LENGEN_CACHE`` or ``~/.cache/lengen``), with L the summed token losses (``sum``)
and their mean over the 64 x 512 predictions (``mean``, the seed's): RMS and max |g|.

    python benchmarks/cms_level_drift.py results/<run>             # every cms-lstm* record in the run
    python benchmarks/cms_level_drift.py results/<run> --surprise
    python benchmarks/cms_level_drift.py                           # the bound at the seed's recipe only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def adam_bound(spec, period: int, offset: int = 0) -> tuple[int, float]:
    """(updates, sum of the level's learning rates over them): the most Adam can move a weight."""
    from lengen.train import lr_factor

    steps = [s for s in range(1, spec.steps + 1) if s > offset and (s - offset) % period == 0]
    return len(steps), sum(spec.lr / period * lr_factor(s - 1, spec) for s in steps)


def surprise_scale(model, rec: dict, rows: int = 64, length: int = 512) -> dict:
    """RMS and max |dL/dy_l| of the surprise levels on the run's evaluation text, L summed or mean."""
    import torch.nn.functional as F

    from lengen.plan import default_cache_dir
    from lengen_text import cache

    hit = cache.load(default_cache_dir(), rec["dataset"]["info"]["cache_key"])
    if hit is None:
        raise SystemExit(f"the corpus of {rec['run_id']} is not in the cache {default_cache_dir()}; run the suite once")
    x = torch.from_numpy(hit[1]["eval_tokens"][:rows * (length + 1)].astype("int64")).view(rows, length + 1)
    out = model(x[:, :-1])
    nll = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
    ys = out.internals["levels"][:len(model.config.surprise_weights)]
    res = {}
    for mode, loss in (("sum", nll.sum()), ("mean", nll.mean())):
        for l, g in enumerate(torch.autograd.grad(loss, ys, retain_graph=True), start=1):
            res[f"{mode}.y{l}"] = (float(g.pow(2).mean().sqrt()), float(g.abs().max()))
    return res


def drift(record_path: Path, surprise: bool = False) -> list[dict]:
    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    from lengen.api import BuildContext
    from lengen.plugins import PluginHost
    from lengen.suites import TrainSpec

    rec = json.loads(record_path.read_text())
    entry = PluginHost().architectures.get(rec["arch"])
    arch = entry.load()
    config = arch.Config(**rec["model"]["config"])
    set_seed(rec["seed"])
    model = arch.build(config, BuildContext(vocab_size=rec["dataset"]["vocab_size"], window=rec["protocol"]["window"]))
    init = [[p.detach().clone() for p in level if p.dim() >= 2] for level in model.levels()]
    model.load_state_dict(load_file(str(record_path.parent / "model.safetensors")))
    if surprise:
        print(f"{rec['arch']} seed {rec['seed']}: surprise targets on 64 x 512 evaluation tokens (RMS, max |g|): "
              + ", ".join(f"{k} {rms:.3g}, {mx:.3g}" for k, (rms, mx) in surprise_scale(model, rec).items()))
    spec = TrainSpec(**rec["suite"]["train"])
    rows = []
    for l, (level, w0s, period) in enumerate(zip(model.levels(), init, config.periods), start=1):
        ws = [p.detach() for p in level if p.dim() >= 2]
        d = torch.cat([(w - w0).abs().flatten() for w, w0 in zip(ws, w0s)])
        updates, bound = adam_bound(spec, period, 1 if config.seed_exact else 0)
        rows.append({"arch": rec["arch"], "seed": rec["seed"], "level": l, "period": period, "updates": updates,
                     "mean_abs_change": float(d.mean()), "max_abs_change": float(d.max()),
                     "init_std": float(torch.cat([w0.flatten() for w0 in w0s]).std()), "adam_bound": bound})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--surprise", action="store_true", help="also the surprise targets' scale on evaluation text")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from lengen.suites import TrainSpec

    seed = TrainSpec(steps=50000, batch_size=64, lr=3e-4, warmup=0, min_lr_ratio=1.0)
    recipe = [{"level": l, "period": n, "updates": adam_bound(seed, n)[0], "adam_bound": adam_bound(seed, n)[1]}
              for l, n in enumerate((1, 16, 256), start=1)]
    rows = [r for run in args.runs for p in sorted(run.glob("**/record.json"))
            if json.loads(p.read_text())["arch"].startswith("cms-lstm") for r in drift(p, args.surprise)]
    if args.json:
        print(json.dumps({"seed_recipe": recipe, "records": rows}, indent=2))
        return
    print("the seed's recipe (constant lr 3e-4, 50k steps): the most Adam can move a weight")
    for r in recipe:
        print(f"  level {r['level']} (every {r['period']}): {r['updates']} updates, <= {r['adam_bound']:.3g} per weight")
    if rows:
        print(f"\n{'arch':<22}{'seed':>5}{'level':>6}{'every':>6}{'updates':>8}{'mean |dw|':>11}{'max |dw|':>10}"
              f"{'Adam bound':>11}{'init std':>10}")
        for r in rows:
            print(f"{r['arch']:<22}{r['seed']:>5}{r['level']:>6}{r['period']:>6}{r['updates']:>8}"
                  f"{r['mean_abs_change']:>11.3g}{r['max_abs_change']:>10.3g}{r['adam_bound']:>11.3g}{r['init_std']:>10.3g}")


if __name__ == "__main__":
    main()
