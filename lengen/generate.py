"""``lengen generate``: what a recorded model writes.

A run's record says everything needed to rebuild its model: the architecture and its config
(``record["model"]``), the dataset and its config with the suite that framed it
(``record["dataset"]``, ``record["suite"]``), the window. :func:`load_model` reloads the
dataset through the plugin registry (the dataset plugins cache their tokenized data, so this
is quick) for its tokenizer (``Corpus.encode`` / ``Corpus.decode``), rebuilds the
architecture through the registry and loads ``model.safetensors``.

:func:`generate` streams tokens. A stateful architecture is fed the prompt once, then one
token at a time with its state carried, so every token costs the same however long the text
grows (an O(W)-state model: a window model's KV cache, TTT's fast weights). A stateless one
is re-fed the last W tokens for every token: also flat in the length, W times the work.
Sampling: temperature (0: greedy), top-k, top-p, from a seeded generator.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from lengen.errors import ConfigError, LengenError
from lengen.results import RECORD, read_record


@dataclass
class Loaded:
    """A recorded model, rebuilt and ready to generate."""

    record: dict
    arch: Any  # lengen.api.Architecture
    model: Any  # torch.nn.Module, eval mode
    window: int
    vocab_size: int
    encode: Callable[[str], list[int]] | None
    decode: Callable[[list[int]], str] | None
    start_token: int  # the first token of an evaluation document: the start when no prompt is given
    device: Any = "cpu"


def find_record(path: Path, arch: str | None = None, seed: int | None = None) -> dict:
    """The record of ``arch`` (and ``seed``) in a run folder, a record folder or a record.json;
    one clear error when there is none or the choice is ambiguous."""
    path = Path(path)
    if not path.exists():
        raise LengenError(f"{path}: no such run folder or record; see `lengen status`")
    files = [path] if path.is_file() else sorted(path.glob(f"**/{RECORD}"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = [r for r in map(read_record, files) if r is not None]
    if not records:
        why = f" ({caught[0].message})" if caught else ""
        raise LengenError(f"{path}: no readable record{why}; a run writes <arch>/seed<k>/record.json as each "
                          f"job finishes")
    found = [r for r in records if (arch is None or r["arch"] == arch) and (seed is None or r["seed"] == seed)]
    have = ", ".join(sorted({f"{r['arch']} seed {r['seed']}" for r in records}))
    if not found:
        want = " ".join(x for x in (arch and f"{arch!r}", seed is not None and f"seed {seed}") if x)
        raise LengenError(f"{path} has no record of {want}; it has: {have}")
    archs = sorted({r["arch"] for r in found})
    if len(archs) > 1:
        raise LengenError(f"{path} holds several architectures ({', '.join(archs)}); pick one with --arch")
    return sorted(found, key=lambda r: (r["seed"], r.get("created", 0)))[0]


def _device(device: str):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    return torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def load_model(host, record: dict, *, device: str = "auto", data_dir: Path | None = None,
               cache_dir: Path | None = None) -> Loaded:
    """Rebuild ``record``'s model with its weights, and its dataset's tokenizer."""
    import torch
    from safetensors.torch import load_model as load_weights

    from lengen.api import BuildContext
    from lengen.plan import RunRequest, data_context
    from lengen.suites import Suite

    weights = Path(record["_path"]).parent / "model.safetensors"
    if not weights.is_file():
        raise LengenError(f"{weights}: the weights are missing; only a finished job's record has them")
    try:
        suite = Suite(**record["suite"])
    except Exception as exc:  # noqa: BLE001 - pydantic's error, said in one line
        raise LengenError(f"{record['_path']}: its suite no longer validates ({type(exc).__name__}); this lengen "
                          "cannot rebuild that run") from None
    ds = record["dataset"]
    ds_entry = host.datasets.get(ds["name"])
    dataset = ds_entry.load()
    corpus = dataset.load(dataset.Config(**ds.get("config", {})),
                          data_context(suite, RunRequest(cache_dir=cache_dir, data_dir=data_dir)))
    if ds.get("fingerprint") and corpus.fingerprint != ds["fingerprint"]:
        warnings.warn(f"dataset {ds['name']!r} now gives other tokens than the run saw (fingerprint "
                      f"{corpus.fingerprint}, recorded {ds['fingerprint']}); its tokenizer may differ", stacklevel=2)
    entry = host.architectures.get(record["arch"])
    arch = entry.load()
    rec_version = record["model"].get("arch_version")
    if rec_version is not None and str(rec_version) != str(arch.version):
        warnings.warn(f"architecture {record['arch']!r} is now version {arch.version}, the record's is "
                      f"{rec_version}: the weights may not fit the code", stacklevel=2)
    window = int(record["protocol"]["window"])
    vocab = int(ds.get("vocab_size") or corpus.vocab_size)
    model = arch.build(arch.Config(**record["model"]["config"]), BuildContext(vocab_size=vocab, window=window))
    try:
        load_weights(model, str(weights))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise LengenError(f"{weights}: the weights do not fit architecture {record['arch']!r} as installed now "
                          f"({str(exc).splitlines()[0][:200]})") from None
    dev = _device(device)
    model.to(dev).eval()
    start = int(corpus.eval.tokens[0]) if len(corpus.eval) else 0
    torch.manual_seed(0)
    return Loaded(record, arch, model, window, vocab, corpus.encode, corpus.decode, start, dev)


def sample(logits, generator, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None) -> int:
    """One token from ``logits`` ``[V]``: greedy at temperature 0, else softmax(logits / T)
    restricted to the ``top_k`` most likely and to the smallest set whose mass reaches ``top_p``."""
    import torch

    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p is not None and top_p < 1:
        p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(p, -1) - p < top_p  # the most likely tokens until the mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ConfigError(f"--temperature {temperature}: use 0 (greedy) or a positive number")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k {top_k}: use a positive number of tokens")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p {top_p}: use a probability mass in (0, 1]")


class Stream:
    """A model reading a stream of tokens: :meth:`feed` takes the next tokens and returns the
    logits of the token after them. A stateful architecture carries its state (the prompt in
    chunks of ``chunk`` tokens, default W); a stateless one keeps its last W tokens and is
    re-fed them. :meth:`copy` forks the stream (its state cloned)."""

    def __init__(self, m: Loaded, chunk: int | None = None):
        self.m, self.chunk = m, chunk or m.window
        self.state: Any = None
        self.context: list[int] = []

    def feed(self, ids: list[int]):
        import torch

        from lengen.api import as_output

        m = self.m
        grad = torch.enable_grad if m.arch.grad_in_eval else torch.no_grad
        with grad():
            if m.arch.stateful:
                x = torch.tensor([list(ids)], dtype=torch.long, device=m.device)
                for a in range(0, x.shape[1], self.chunk):
                    out = as_output(m.model(x[:, a:a + self.chunk], self.state))
                    self.state = out.state
                return out.logits[0, -1].detach().cpu()
            self.context = (self.context + list(ids))[-m.window:]
            out = as_output(m.model(torch.tensor([self.context], device=m.device), None))
            return out.logits[0, -1].detach().cpu()

    def copy(self) -> "Stream":
        import torch
        from torch.utils._pytree import tree_map

        other = Stream(self.m, self.chunk)
        other.state = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.state)
        other.context = list(self.context)
        return other


def generate(m: Loaded, prompt: list[int], n: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, chunk: int | None = None,
             stream: Stream | None = None) -> Iterator[int]:
    """Yield ``n`` tokens following ``prompt`` (token ids, at least one), read by ``stream``
    (default: a new :class:`Stream`; pass one to continue it)."""
    import torch

    check_sampling(temperature, top_k, top_p)
    if not prompt:
        raise ConfigError("the prompt has no tokens; give --prompt TEXT or leave it out to start a document")
    bad = [t for t in prompt if not 0 <= t < m.vocab_size]
    if bad:
        raise ConfigError(f"prompt token {bad[0]} is outside the vocabulary (0..{m.vocab_size - 1})")
    gen = torch.Generator().manual_seed(seed)
    stream = stream or Stream(m, chunk)
    logits = stream.feed(prompt)
    for i in range(n):
        tok = sample(logits, gen, temperature=temperature, top_k=top_k, top_p=top_p)
        yield tok
        if i < n - 1:
            logits = stream.feed([tok])


class Detokenizer:
    """Text of a growing token list, piece by piece, at constant cost per token: each new
    piece is ``decode(ids[a:])`` minus ``decode(ids[a:b])`` for a short look-back, so word
    separators (the synthetic language's spaces, BPE's leading spaces) come out right, and a
    multi-byte character split over tokens waits until it is whole."""

    def __init__(self, decode: Callable[[list[int]], str] | None, context: list[int]):
        self.decode = decode or (lambda ids: " ".join(map(str, ids)))
        self.ids = list(context)
        self.prefix = max(0, len(self.ids) - 4)
        self.read = len(self.ids)

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        before = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]


def timed(tokens: Iterator[int]) -> Iterator[tuple[int, float]]:
    """``(token, seconds since the generation started)`` for each token."""
    t0 = time.perf_counter()
    for tok in tokens:
        yield tok, time.perf_counter() - t0
