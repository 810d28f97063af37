"""Time TTT's compiled CPU kernels on their own, at the training benchmark's sizes
(train_speed.py: batch 8 x 4 heads = 32 (sequence, head) problems, L = 64, head dim 64,
TTT-MLP hidden 256, mini-batch 16, fp32): one forward + backward of each dual-form block, and
of the layer's glue functions (QKV, Readout) through autograd, kernels against the torch code.

    python benchmarks/ttt_kernels.py                       # this checkout's kernels
    python benchmarks/ttt_kernels.py --against HEAD~3      # and another revision's, interleaved

``--against REV`` builds that revision's ``plugins/lengen_ttt/*.cpp`` (read with ``git show``)
as a second extension and alternates the two round by round, so both see the same machine
load; the ratio column is this checkout / REV. Medians over all timed calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from lengen import allocator  # noqa: E402
from lengen_ttt import kernels  # noqa: E402
from lengen_ttt.model import QKV, Readout, coefficient_masks  # noqa: E402


def build_revision(rev: str):
    from torch.utils.cpp_extension import load

    tmp = Path(tempfile.mkdtemp(prefix="lengen_ttt_rev_"))
    sources = []
    for name in ("blocks.cpp", "glue.cpp"):
        text = subprocess.run(["git", "show", f"{rev}:plugins/lengen_ttt/{name}"], cwd=ROOT, capture_output=True,
                              text=True)
        if text.returncode == 0:  # revisions before glue.cpp have blocks.cpp only
            (tmp / name).write_text(text.stdout)
            sources.append(str(tmp / name))
    if not sources:
        sys.exit(f"ttt_kernels.py: {rev} has no plugins/lengen_ttt/blocks.cpp (git show failed)")
    rev_id = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True).stdout
    return load(name=f"lengen_ttt_rev_{rev_id.strip()}", sources=sources, extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"], build_directory=str(tmp), verbose=False)


def block_calls(ext, N=32, S=64, d=64, h=256, K=16):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    qx, bt, dout = r(N, 2 * S, d) * 0.5, r(N, S, d), r(N, S, d)
    lr = torch.rand(N, S, generator=g) * 0.01
    s = 1.0 / torch.arange(1, K + 1).float()
    mqk, s_last = coefficient_masks(s, S, K).contiguous(), float(s[K - 1])
    g2 = torch.rand(N, 1, d, generator=g) + 0.5
    W, b = r(N, d, d) * 0.02, torch.zeros(N, 1, d)
    W1, b1, W2, b2 = r(N, d, h) * 0.02, torch.zeros(N, 1, h), r(N, h, d) * 0.02, torch.zeros(N, 1, d)

    def linear():
        _, _, _, *saved = ext.forward(qx, bt, lr, mqk, s_last, g2, W, b, K, 1e-6)
        ext.backward(dout, None, None, qx, bt, lr, mqk, s_last, g2, W, *saved, K)

    def mlp():
        _, _, _, _, _, *saved = ext.mlp_forward(qx, bt, lr, mqk, s_last, g2, W1, b1, W2, b2, K, 1e-6)
        ext.mlp_backward([dout, None, None, None, None], qx, bt, lr, mqk, s_last, g2, W1, W2, saved, K)

    return {"TTT-Linear block": linear, "TTT-MLP block": mlp}


def glue_calls(B=8, T=64, H=4, d=64):
    g = torch.Generator().manual_seed(0)
    P = torch.randn(B, T, 3 * H * d + H, generator=g).requires_grad_()
    lr_bias = torch.zeros(H, requires_grad=True)
    rot = torch.polar(torch.ones(T, d // 2), torch.rand(T, d // 2, generator=g))
    z, q = (torch.randn(B, H, T, d, generator=g).requires_grad_() for _ in range(2))
    w, b = torch.rand(H, 1, d).requires_grad_(), torch.zeros(H, 1, d, requires_grad=True)
    pw, pb = torch.ones(H * d, requires_grad=True), torch.zeros(H * d, requires_grad=True)

    def qkv():
        outs = QKV.apply(P, rot, lr_bias, H, 0.3)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    def readout():
        y = Readout.apply(z, q, w, b, pw, pb, 1e-6, 1e-6)
        y.backward(torch.ones_like(y))

    return {"QKV": qkv, "Readout": readout}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=3, help="timed calls per function per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--against", metavar="REV", help="also time this git revision's kernels, interleaved")
    args = ap.parse_args(argv)
    allocator.tune()
    torch.set_num_threads(args.threads)
    os.environ["LENGEN_TTT_KERNEL"] = "cpp"
    here = kernels.cpu_kernels()
    variants = {"this checkout": block_calls(here)}
    if args.against:
        variants[args.against] = block_calls(build_revision(args.against))
    glue = glue_calls()
    times: dict[tuple[str, str], list[float]] = {}

    def timed(key, fn):
        for _ in range(args.calls):
            t0 = time.perf_counter()
            fn()
            times.setdefault(key, []).append(time.perf_counter() - t0)

    for rnd in range(args.rounds + 1):  # round 0 warms up and is dropped
        for label, calls in variants.items():
            for name, fn in calls.items():
                timed((name, label), fn)
        for mode in ("cpp", "torch"):
            os.environ["LENGEN_TTT_KERNEL"] = mode
            for name, fn in glue.items():
                timed((f"{name} (autograd)", "kernel" if mode == "cpp" else "torch code"), fn)
        os.environ["LENGEN_TTT_KERNEL"] = "cpp"
        if rnd == 0:
            times.clear()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"forward + backward, ms, medians of {args.rounds} x {args.calls} calls, {args.threads} threads")
    rows: dict[str, dict[str, float]] = {}
    for (name, label), ms in med.items():
        rows.setdefault(name, {})[label] = ms
    for name, by in rows.items():
        labels = list(by)
        cells = "  ".join(f"{lab}: {by[lab]:.3f}" for lab in labels)
        ratio = f"  ratio {by[labels[0]] / by[labels[1]]:.3f}" if len(labels) == 2 else ""
        print(f"{name:<22}{cells}{ratio}")


if __name__ == "__main__":
    main()
