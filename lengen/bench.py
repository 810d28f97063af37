"""``lengen bench eval``: evaluation cost against length, for one architecture.

For each length L = k x W, a batch of random token sequences (cost does not depend on the
token values or, for the built-ins, on the weights) is scored the way evaluation scores it
(stateful models streamed in chunks of W with their state carried), timed over repeats
(median), and once more under the live-tensor memory tracker for peak memory.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from lengen import measure
from lengen.evaluate import Scorer


def bench_eval(model, arch, *, window: int, vocab_size: int, multiples: list[float], batch: int = 1,
               repeats: int = 5, device="cpu", chunk: int | None = None, progress=None) -> list[dict]:
    rng = np.random.default_rng(0)
    chunk = chunk if chunk is not None else (window if arch.stateful else None)
    rows = []
    for k in multiples:
        L = max(1, int(round(k * window)))
        seqs = rng.integers(0, vocab_size, size=(batch, L + 1))
        scorer = Scorer(model, arch, device=device, chunk=chunk, batch_tokens=batch * L)
        scorer.score_rows(seqs, L)  # warm-up
        times = []
        for _ in range(repeats):
            if getattr(device, "type", device) == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            scorer.score_rows(seqs, L)
            if getattr(device, "type", device) == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        _, peak, how = measure.peak_memory(lambda: scorer.score_rows(seqs, L), device)
        med = statistics.median(times)
        rows.append({"multiple": k, "length": L, "batch": batch, "chunk": chunk, "repeats": repeats,
                     "median_s": med, "tokens_per_s": batch * L / med, "us_per_token": 1e6 * med / (batch * L),
                     "peak_memory_bytes": peak, "memory_method": how})
        if progress:
            progress(k)
    base = rows[0]
    for r in rows:
        r["time_per_token_vs_first"] = r["us_per_token"] / base["us_per_token"]
        r["memory_vs_first"] = r["peak_memory_bytes"] / base["peak_memory_bytes"] if base["peak_memory_bytes"] else None
    return rows
