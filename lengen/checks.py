"""The conformance kit behind ``lengen check`` and :mod:`lengen.testing`.

Each check returns a :class:`CheckResult` with a reason a plugin author can act on. They run
on CPU in seconds with small random inputs; none needs training.

Architectures: causality, state equivalence (streaming in chunks == one pass), window
equivalence (window-mode evaluation at L = W == full mode), determinism under a seed,
finite outputs at 20 x W, state kept out of registered buffers, config rejects unknown
keys, output shape.
Datasets: deterministic streams and a stable fingerprint for a seed, well-formed splits.
Metrics: declared best values on perfect predictions, finite outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

UNKNOWN_KEY = "lengen_check_unknown_key"


@dataclass
class CheckResult:
    name: str
    passed: bool | None  # None: not applicable (skipped)
    reason: str = ""
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return {True: "pass", False: "FAIL", None: "skip"}[self.passed]


class CheckFailed(AssertionError):
    pass


def run_check(name: str, fn: Callable[[], str | None]) -> CheckResult:
    t0 = time.perf_counter()
    try:
        note = fn()
        passed = None if note and note.startswith("skip:") else True
        reason = note.removeprefix("skip:").strip() if note else ""
    except CheckFailed as exc:
        passed, reason = False, str(exc)
    except Exception as exc:  # noqa: BLE001 - a crash is a failed check with its reason
        passed, reason = False, f"raised {type(exc).__name__}: {exc}"
    return CheckResult(name, passed, reason, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------
# architectures


@dataclass
class ArchSubject:
    """What the architecture checks need: the spec, a config, and the sizes to test at."""

    arch: Any
    config: Any
    window: int = 16
    vocab_size: int = 64
    seed: int = 0

    def build(self, seed: int | None = None):
        import torch

        from lengen.api import BuildContext

        torch.manual_seed(self.seed if seed is None else seed)
        model = self.arch.build(self.config, BuildContext(vocab_size=self.vocab_size, window=self.window))
        model.eval()
        return model

    def forward(self, model, x, state=None):
        import torch

        from lengen.api import as_output

        grad = torch.enable_grad() if self.arch.grad_in_eval else torch.no_grad()
        with grad:
            out = as_output(model(x, state) if self.arch.stateful else model(x))
        return out

    def tokens(self, batch: int, length: int, seed: int = 1):
        import torch

        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.vocab_size, (batch, length), generator=g)


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def check_output_shape(s: ArchSubject) -> str | None:
    model = s.build()
    x = s.tokens(2, s.window)
    out = s.forward(model, x)
    shape = tuple(out.logits.shape)
    if shape != (2, s.window, s.vocab_size):
        raise CheckFailed(f"forward returned logits of shape {shape}, expected (batch, time, vocab) = "
                          f"{(2, s.window, s.vocab_size)}")
    if s.arch.stateful and out.state is None:
        raise CheckFailed("the architecture declares stateful = True but forward returned state None")
    return None


def check_causality(s: ArchSubject, atol: float = 1e-5) -> str | None:
    """Changing tokens after position t never changes the prediction at t."""
    model = s.build()
    L = 2 * s.window + 7
    x = s.tokens(2, L)
    base = s.forward(model, x).logits
    for t in sorted({0, s.window // 2, s.window - 1, s.window, L - 2}):
        y = x.clone()
        y[:, t + 1:] = (y[:, t + 1:] + 1 + s.tokens(2, L - t - 1, seed=t + 2)) % s.vocab_size
        out = s.forward(model, y).logits
        d = _max_diff(out[:, :t + 1], base[:, :t + 1])
        if d > atol:
            worst = int((out[:, :t + 1].float() - base[:, :t + 1].float()).abs().amax(dim=(0, 2)).argmax())
            raise CheckFailed(
                f"changing the tokens after index {t} changed the logits at index {worst} (0-based) by {d:.3g}: the "
                "model sees the future (check attention masks, convolution padding, any shift of the targets; if "
                "determinism fails too, fix that first)")
    return None


def check_state_equivalence(s: ArchSubject, chunks=(1, 7, 16), atol: float = 1e-4) -> str | None:
    """Streaming the same tokens in chunks with the state carried equals one pass."""
    if not s.arch.stateful:
        return "skip: the architecture declares no state (stateful = False)"
    model = s.build()
    L = 2 * s.window + 13
    x = s.tokens(2, L)
    one = s.forward(model, x).logits
    for c in chunks:
        state, outs = None, []
        for a in range(0, L, c):
            out = s.forward(model, x[:, a:a + c], state)
            outs.append(out.logits)
            state = out.state
        streamed = __import__("torch").cat(outs, 1)
        d = _max_diff(streamed, one)
        if d > atol:
            first = int(((streamed.float() - one.float()).abs().amax(dim=(0, 2)) > atol).nonzero()[0])
            raise CheckFailed(
                f"streaming in chunks of {c} differs from one pass by up to {d:.3g} (first at index {first}, 0-based): "
                "the returned state does not carry everything the next chunk needs")
    return None


def check_window_equivalence(s: ArchSubject) -> str | None:
    """Window-mode evaluation at L = W equals full mode."""
    from lengen.evaluate import Scorer, score_full, score_window

    model = s.build()
    seqs = s.tokens(3, s.window + 1).numpy()
    full = score_full(Scorer(model, s.arch), seqs, {})
    win = score_window(Scorer(model, s.arch), seqs, {}, window=s.window, stride=max(1, s.window // 4))
    d = float(np.abs(full.nll - win.nll).max())
    if d > 1e-6:
        raise CheckFailed(f"window-mode evaluation at L = W differs from full mode by {d:.3g} nats: the first "
                          "W predictions must not depend on how the harness batches them")
    return None


def check_determinism(s: ArchSubject) -> str | None:
    """The same seed builds the same weights, and forward is a function of its inputs."""
    a, b = s.build(seed=123), s.build(seed=123)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if not (sa[k] == sb[k]).all():
            raise CheckFailed(f"two builds under seed 123 differ in parameter {k!r}: initialise only from "
                              "torch's global RNG (seeded by the harness)")
    x = s.tokens(2, s.window + 5)
    o1, o2 = s.forward(a, x).logits, s.forward(a, x).logits
    d = _max_diff(o1, o2)
    if d > 0:
        raise CheckFailed(f"two forward passes over the same tokens differ by {d:.3g}: the forward is "
                          "non-deterministic (randomness or dropout in eval mode?)")
    o3 = s.forward(b, x).logits
    if _max_diff(o1, o3) > 0:
        raise CheckFailed("two models built under the same seed give different outputs")
    return None


def check_finite_long(s: ArchSubject, multiple: int = 20) -> str | None:
    """Finite logits at 20 x W (fed as evaluation feeds it: streamed in chunks of W if stateful)."""
    import torch

    model = s.build()
    L = multiple * s.window
    x = s.tokens(1, L)
    if s.arch.stateful:
        state, worst = None, 0.0
        for a in range(0, L, s.window):
            out = s.forward(model, x[:, a:a + s.window], state)
            state = out.state
            if not torch.isfinite(out.logits).all():
                raise CheckFailed(f"non-finite logits at positions {a}..{a + s.window} of a {multiple} x W stream")
            worst = max(worst, float(out.logits.abs().max()))
    else:
        out = s.forward(model, x)
        if not torch.isfinite(out.logits).all():
            raise CheckFailed(f"non-finite logits in a sequence of {multiple} x W tokens")
    return None


def check_state_not_in_buffers(s: ArchSubject) -> str | None:
    """A forward leaves the module's registered buffers as they were: state kept in buffers
    would be shared by every sequence of a batch, and data-parallel training overwrites
    buffers with rank 0's on every forward. Carried state belongs in the returned state."""
    model = s.build()
    before = {k: b.detach().clone() for k, b in model.named_buffers()}
    if not before:
        return None
    x = s.tokens(2, s.window + 3)
    out = s.forward(model, x)
    if s.arch.stateful:
        s.forward(model, x, out.state)
    model.train()
    s.forward(model, s.tokens(2, s.window, seed=5))
    changed = [k for k, b in model.named_buffers() if k in before and not __import__("torch").equal(b, before[k])]
    if changed:
        raise CheckFailed(f"the forward changed the registered buffer(s) {', '.join(changed[:3])}: keep carried state "
                          "in the state forward returns (buffers are shared by every sequence and overwritten by "
                          "data-parallel training)")
    return None


def check_config_strict(s: ArchSubject) -> str | None:
    """The config class rejects a key it does not know."""
    from pydantic import ValidationError

    cls = type(s.config)
    try:
        cls(**{**s.config.model_dump(), UNKNOWN_KEY: 1})
    except ValidationError:
        return None
    except TypeError:
        return None
    raise CheckFailed(f"{cls.__name__} accepted the unknown key {UNKNOWN_KEY!r}: subclass lengen.api.ArchConfig "
                      "(extra keys forbidden) so that a misspelt setting is an error")


ARCH_CHECKS: dict[str, Callable] = {
    "output shape": check_output_shape,
    "causality": check_causality,
    "state equivalence": check_state_equivalence,
    "window equivalence": check_window_equivalence,
    "determinism": check_determinism,
    "finite at 20 x W": check_finite_long,
    "state not in buffers": check_state_not_in_buffers,
    "config rejects unknown keys": check_config_strict,
}


def check_architecture(subject: ArchSubject, only: list[str] | None = None) -> list[CheckResult]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs: one thread is as fast, and immune to a busy machine
    try:
        return [run_check(name, lambda fn=fn: fn(subject)) for name, fn in ARCH_CHECKS.items()
                if only is None or name in only]
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------
# datasets


def check_dataset(dataset, config, ctx) -> list[CheckResult]:
    """Each load gets a fresh cache folder, so a cached dataset is really rebuilt and compared."""
    import tempfile
    from dataclasses import replace

    loaded: dict[str, Any] = {}
    tmp = tempfile.TemporaryDirectory(prefix="lengen-check-")

    def fresh(seed: int):
        return replace(ctx, seed=seed, cache_dir=Path(tempfile.mkdtemp(dir=tmp.name)))

    def load():
        dataset.validate(config, fresh(ctx.seed))
        a = dataset.load(config, fresh(ctx.seed))
        loaded["a"] = a
        for name, split in (("train", a.train), ("eval", a.eval)):
            toks = np.asarray(split.tokens)
            if toks.ndim != 1 or len(toks) == 0:
                raise CheckFailed(f"{name} tokens must be a non-empty 1-d array, got shape {toks.shape}")
            if toks.min() < 0 or toks.max() >= a.vocab_size:
                raise CheckFailed(f"{name} tokens lie outside [0, vocab_size = {a.vocab_size})")
            starts = np.asarray(split.doc_starts)
            if len(starts) == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= len(toks):
                raise CheckFailed(f"{name} doc_starts must start at 0 and increase strictly within the stream")
            for k, v in split.annotations.items():
                if len(v) != len(toks):
                    raise CheckFailed(f"{name} annotation {k!r} has {len(v)} entries for {len(toks)} tokens")
        if not a.fingerprint:
            raise CheckFailed("the corpus has an empty fingerprint")
        return None

    def deterministic():
        if "a" not in loaded:
            return "skip: loading failed"
        b = dataset.load(config, fresh(ctx.seed))
        a = loaded["a"]
        for name in ("train", "eval"):
            if not np.array_equal(getattr(a, name).tokens, getattr(b, name).tokens):
                raise CheckFailed(f"two loads with the same seed gave different {name} tokens")
        if a.fingerprint != b.fingerprint:
            raise CheckFailed("two loads with the same seed gave different fingerprints")
        c = dataset.load(config, fresh(ctx.seed + 1))
        if c.fingerprint == a.fingerprint and not (np.array_equal(c.train.tokens, a.train.tokens)
                                                   and np.array_equal(c.eval.tokens, a.eval.tokens)):
            raise CheckFailed("another seed changed the tokens but not the fingerprint")
        return None

    with tmp:
        return [run_check("loads well-formed splits", load), run_check("deterministic, stable fingerprint", deterministic)]


# ---------------------------------------------------------------------------------------
# metrics


def synthetic_scores(metric, perfect: bool, n: int = 8, length: int = 64, vocab: int = 32, seed: int = 0):
    """Scores with perfect predictions (NLL 0, all correct) or uniform guessing, and the
    annotations and corpus info the metric's :meth:`~lengen.api.Metric.example_inputs` gives."""
    from lengen.api import Scores

    rng = np.random.default_rng(seed)
    ann, info = metric.example_inputs(n, length, np.random.default_rng(seed + 1))
    nll = np.zeros((n, length)) if perfect else np.full((n, length), np.log(vocab))
    correct = np.ones((n, length), bool) if perfect else rng.random((n, length)) < 1 / vocab
    s = Scores(nll, correct, dict(ann))
    s.lengths = {l: (nll[:, :l].sum(1), np.full(n, l)) for l in (8, 16, 64)}
    s.context = {c: (nll[:, -4:].sum(1), np.full(n, 4), c) for c in (4, 16, 60)}
    return s, info


def check_metric(metric, config, window: int = 16) -> list[CheckResult]:
    from lengen.api import MetricContext, Series, Value

    from dataclasses import replace

    ctx = MetricContext(window=window, positions=(1, 2, 4), bucket=4, bootstrap=50, lengths=(8, 16, 64),
                        contexts=(4, 16, 60))
    results: dict[str, dict] = {}

    def runs():
        for label, perfect in (("perfect", True), ("uniform", False)):
            scores, info = synthetic_scores(metric, perfect)
            lacking = [r for r in metric.requires if r not in scores.annotations]
            if lacking:
                return (f"skip: needs annotations {lacking}; give the metric an example_inputs method that "
                        "returns plausible ones")
            out = metric.compute(scores, config, replace(ctx, info=info))
            if not isinstance(out, dict) or not out:
                raise CheckFailed("compute must return a non-empty dict of Value or Series")
            for k, v in out.items():
                if not isinstance(v, (Value, Series)):
                    raise CheckFailed(f"output {k!r} is a {type(v).__name__}, not a lengen.api.Value or Series")
            results[label] = out
        return None

    def best():
        if "perfect" not in results:
            return "skip: compute did not run"
        declared = getattr(metric, "perfect", {}) or {}
        if not declared:
            return "skip: the metric declares no perfect values (Metric.perfect)"
        for k, want in declared.items():
            got = results["perfect"].get(k)
            if got is None:
                raise CheckFailed(f"declared perfect output {k!r} was not produced")
            if not np.isclose(got.value, want):
                raise CheckFailed(f"{k} = {got.value:.4g} on perfect predictions; the best value is {want}")
            worse = results["uniform"].get(k)
            if worse is not None and np.isclose(worse.value, want):
                raise CheckFailed(f"{k} is {want} for uniform guessing too: it does not measure predictions")
        return None

    return [run_check("computes Values and Series", runs), run_check("best value on perfect predictions", best)]


# ---------------------------------------------------------------------------------------
# `lengen check`


def check_components(host, *, archs: list[str], datasets: list[str], metrics: list[str], benchmark: str,
                     overrides: list[str], benchmarks_file: Path | None, data_dir: Path | None,
                     window: int | None = None) -> list[dict]:
    """Run the conformance kit on the named components with the suite's settings."""
    from lengen.api import DataContext
    from lengen.plan import arch_config, default_cache_dir, resolve_suite, validate_config

    suite, origin = resolve_suite(host, benchmark, overrides, benchmarks_file)
    rows = []

    def add(component, results):
        rows.extend({"component": component, "check": r.name, "passed": r.passed, "reason": r.reason,
                     "seconds": r.seconds} for r in results)

    for name in archs:
        entry = host.architectures.get(name)
        arch = entry.load()
        cfg = arch_config(entry, arch, suite, name, origin)
        add(f"arch {name}", check_architecture(ArchSubject(arch, cfg, window=window or suite.window)))
    for name in datasets:
        ds = host.datasets.load(name)
        cfg = validate_config(ds.Config, suite.data if name == suite.dataset else {}, suite=suite.name,
                              table=["data"], origin=origin)
        ctx = DataContext(seed=suite.data_seed, window=suite.window, eval_length=suite.eval_tokens,
                          eval_sequences=min(4, suite.eval.sequences), train_tokens=50 * suite.window,
                          cache_dir=default_cache_dir(), data_dir=data_dir, tokenizer=suite.tokenizer)
        add(f"dataset {name}", check_dataset(ds, cfg, ctx))
    for name in metrics:
        metric = host.metrics.load(name)
        cfg = validate_config(metric.Config, suite.metrics.get(name, {}), suite=suite.name,
                              table=["metrics", name], origin=origin)
        add(f"metric {name}", check_metric(metric, cfg))
    return rows
