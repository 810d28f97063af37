"""The public contracts that architecture, dataset and metric plugins implement.

Nothing here imports torch: configs and specs must be importable by ``lengen plugins``
and ``lengen --help``. The model code a plugin builds lives in its own module.

Architecture
    Subclass :class:`Architecture`, give it a :class:`ArchConfig` subclass, and return an
    ``nn.Module`` from ``build``. The module's ``forward(input_ids, state=None)`` returns
    ``(logits, state)`` or an :class:`Output` (which adds auxiliary losses and per-token
    compute statistics). ``input_ids`` is ``[batch, time]`` int64, ``logits`` is
    ``[batch, time, vocab]``; position ``t``'s logits may depend only on tokens ``<= t``
    and on ``state``. Passing the returned state back in continues the same streams.

Dataset
    Subclass :class:`Dataset`; ``load(config, ctx)`` returns a :class:`Corpus` whose train
    and eval :class:`Split` s are deterministic functions of the config and ``ctx.seed``.

Metric
    Subclass :class:`Metric`; ``compute(scores, config, ctx)`` turns per-token NLL,
    correctness and annotations into :class:`Value` s and :class:`Series` with intervals.
    ``outputs`` (:class:`OutputSpec`) and ``plots`` (:class:`PlotSpec`) declare how the
    leaderboard, checkpoint tracking and plots treat them: the core knows no metric by name.
"""

from __future__ import annotations

import hashlib
import json
import fnmatch
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

# ---------------------------------------------------------------------------------------
# configs


class StrictConfig(BaseModel):
    """A typed config that rejects unknown keys; fields document themselves."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    def hash(self) -> str:
        return config_hash(self.model_dump(mode="json"))


class ArchConfig(StrictConfig):
    """Base class of architecture configs."""


class DatasetConfig(StrictConfig):
    """Base class of dataset configs."""


class MetricConfig(StrictConfig):
    """Base class of metric configs."""


def config_hash(obj: Any) -> str:
    """Short, stable hash of a JSON-able object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# architectures


@dataclass(frozen=True)
class BuildContext:
    """What the harness knows when it builds a model."""

    vocab_size: int
    window: int  # the benchmark's training window W


@dataclass
class ParamGroup:
    """An optimizer parameter group an architecture asks for.

    ``update_every=n`` sums this group's gradients over ``n`` optimizer steps and applies the
    sum on steps n, 2n, ... (1-based) with an optimizer of its own, whose moments advance only
    on those steps (the CMS-LSTM's slow levels); ``lr_scale`` multiplies the benchmark's
    learning rate; ``weight_decay=None`` keeps the benchmark's value. ``offset=k`` shifts the
    schedule to steps k + n, k + 2n, ... (the gradients of the first k steps join the first
    update; ``offset=1`` is a 0-indexed schedule that skips step 0). The groups must hold
    every trainable parameter exactly once.
    """

    params: list
    name: str = "default"
    lr_scale: float = 1.0
    weight_decay: float | None = None
    update_every: int = 1
    offset: int = 0


@dataclass
class Output:
    """What a model's forward may return instead of a ``(logits, state)`` tuple.

    ``aux_losses``: named scalar losses, already weighted, added to the training loss and
    reported apart from the language-modelling loss. ``stats``: named per-token tensors
    ``[batch, time]`` (e.g. inner iterations, FLOPs) averaged and recorded at evaluation.
    ``logs``: named scalars logged during training beside the loss but not added to it (a
    state norm). ``internals``: tensors :meth:`Architecture.training_losses` needs (e.g. a
    layer's output, to take the loss's gradient with respect to it); never recorded.
    """

    logits: Any
    state: Any = None
    aux_losses: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    logs: dict[str, Any] = field(default_factory=dict)
    internals: dict[str, Any] = field(default_factory=dict)


def as_output(ret: Any) -> Output:
    if isinstance(ret, Output):
        return ret
    if isinstance(ret, tuple) and len(ret) == 2:
        return Output(ret[0], ret[1])
    raise TypeError(
        "a model's forward must return (logits, state) or lengen.api.Output, "
        f"got {type(ret).__name__}"
    )


class Architecture(ABC):
    """Base class of architecture plugins (subclass; instantiated without arguments)."""

    description: ClassVar[str] = ""
    Config: ClassVar[type[ArchConfig]] = ArchConfig
    #: bump when the model's computation changes: older results become stale
    version: ClassVar[str] = "1"
    #: forward takes and returns a state that carries context across calls
    stateful: ClassVar[bool] = False
    #: the state may be carried across consecutive training windows (truncated backprop)
    train_state_passing: ClassVar[bool] = False
    #: evaluation must run with autograd enabled (e.g. an inner loop using autograd)
    grad_in_eval: ClassVar[bool] = False

    @abstractmethod
    def build(self, config: ArchConfig, ctx: BuildContext):  # -> torch.nn.Module
        """Return the ``nn.Module`` for ``config`` (randomly initialised)."""

    def param_groups(self, model, config: ArchConfig) -> list[ParamGroup] | None:
        """Own optimizer groups and update schedule; ``None`` uses the harness's default
        (weight decay on matrices, none on vectors)."""
        return None

    def training_losses(self, model, output: "Output", targets, token_nll) -> dict[str, Any]:
        """Optional: auxiliary training losses that need the targets or the LM loss, called
        after every training forward with the (unwrapped) model, its :class:`Output`, the
        targets ``[batch, time]`` and the per-token NLL ``[batch, time]`` (with its graph).
        Returned scalars are added to the loss and logged apart, like ``Output.aux_losses``.
        E.g. a "surprise" term: ``torch.autograd.grad(token_nll.sum(), output.internals["y"],
        retain_graph=True)``."""
        return {}

    def flops_per_token(self, model, config: ArchConfig, seq_len: int) -> float | dict[str, float] | None:
        """Analytic forward FLOPs per predicted token of one sequence of ``seq_len`` tokens, for
        models whose compute the FLOP counter cannot see (compiled kernels, data-dependent
        loops); the convention is the counter's: matrix-multiply FLOPs, 2 per multiply-add.
        A dict gives named parts (e.g. ``{"inner_loop": ..., "rest": ...}``) whose sum is the
        total. ``None``: measure with ``torch.utils.flop_counter.FlopCounterMode``."""
        return None

    def variants(self, config: ArchConfig) -> dict[str, dict] | None:
        """Optional: named evaluations of the same trained weights under config changes that
        leave the weights alone (an inference policy, a threshold). Each variant is built from
        ``config`` updated with its dict, given the trained weights, calibrated, evaluated and
        recorded as ``<architecture>.<variant>`` (its own leaderboard row). ``None``: one
        evaluation with ``config``."""
        return None

    def calibrate(self, model, config: ArchConfig, sequences, device) -> dict | None:
        """Optional: called after training and before evaluation with calibration sequences
        ``[N, L + 1]`` cut from the training split (never the evaluation data), to set what
        evaluation needs (e.g. thresholds frozen from percentiles of a signal) on the model.
        Return what to record (JSON-able) in the record's ``calibration``."""
        return None


# ---------------------------------------------------------------------------------------
# datasets


@dataclass
class Split:
    """A token stream: documents concatenated, with where each starts.

    ``annotations`` holds per-token arrays aligned with ``tokens`` (for the synthetic
    language: ``optimal_nll``, ``recall_kind``, ``recall_distance``).
    """

    tokens: Any  # np.ndarray[int]
    doc_starts: Any  # np.ndarray[int64], sorted, doc_starts[0] == 0
    annotations: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    def documents(self):
        """Yield ``(start, end)`` of each document."""
        starts = list(self.doc_starts) + [len(self.tokens)]
        for a, b in zip(starts[:-1], starts[1:]):
            yield int(a), int(b)


@dataclass
class Corpus:
    train: Split
    eval: Split
    vocab_size: int
    fingerprint: str  # changes whenever the token streams would change
    tokenizer: dict = field(default_factory=dict)  # name, settings, hash
    info: dict = field(default_factory=dict)  # anything worth recording
    decode: Any = None  # optional: list[int] -> str
    encode: Any = None  # optional: str -> list[int] (``lengen generate --prompt``)


@dataclass(frozen=True)
class DataContext:
    """What the harness tells a dataset when it loads it."""

    seed: int
    window: int
    eval_length: int  # the longest evaluation sequence, in predicted tokens
    eval_sequences: int  # how many evaluation sequences the benchmark wants
    train_tokens: int  # how many training tokens the run will consume (a hint)
    cache_dir: Path
    data_dir: Path | None = None
    tokenizer: dict | None = None
    #: optional: call with a short message to show what a long load is doing
    progress: Any = None


class Dataset(ABC):
    """Base class of dataset plugins."""

    description: ClassVar[str] = ""
    Config: ClassVar[type[DatasetConfig]] = DatasetConfig
    version: ClassVar[str] = "1"

    @abstractmethod
    def load(self, config: DatasetConfig, ctx: DataContext) -> Corpus:
        """Return the train and eval streams for ``config`` and ``ctx``."""

    def validate(self, config: DatasetConfig, ctx: DataContext) -> None:
        """Optional, cheap: raise a ``lengen.errors.ConfigError`` for a setting that cannot work
        (missing files, an unreachable source, a bad tokenizer table) before anything trains."""


# ---------------------------------------------------------------------------------------
# metrics


@dataclass
class Value:
    """A measured value with its interval and the standard error it came with."""

    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    stderr: float | None = None
    n: int | None = None  # how many units the interval is over (sequences, answers)
    #: the range the quantity can take, (low, high), None for unbounded: a recall is in [0, 1],
    #: a perplexity >= 1. Intervals combined across seeds are clipped to it.
    bounds: tuple[float | None, float | None] | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Series:
    """A curve: ``values[i]`` measured at ``x[i]`` (in units of ``x_unit``)."""

    x: list[float]
    values: list[Value]
    x_unit: str = "W"

    def as_dict(self) -> dict:
        return {"x": list(self.x), "x_unit": self.x_unit, "values": [v.as_dict() for v in self.values]}


@dataclass
class Scores:
    """Per-token results of one evaluation, ``[n_sequences, length]`` arrays.

    Column ``j`` is the prediction of the token at position ``p = j + 1``, made from the
    ``p`` tokens before it (the first of which is the start of the sequence). In
    ``nonoverlapping`` mode there are no position-wise arrays (``nll`` is ``None``), only
    ``lengths``.
    """

    nll: Any  # float64 natural-log loss, or None
    correct: Any  # bool, argmax == target, or None
    annotations: dict[str, Any]
    mode: str = "full"
    #: evaluation length l (tokens) -> (per-sequence NLL sums, per-sequence token counts)
    lengths: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    #: available context c (tokens) -> (per-sequence NLL sums, counts, context actually given)
    context: dict[int, tuple[Any, Any, int]] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.nll.shape[1]


@dataclass(frozen=True)
class MetricContext:
    window: int
    positions: tuple[int, ...]  # multiples of W to report
    bucket: int  # tokens per position bucket
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0
    info: dict = field(default_factory=dict)  # the corpus's info (e.g. chance_recall)
    lengths: tuple[int, ...] = ()  # the perplexity-vs-length grid, in tokens
    contexts: tuple[int, ...] = ()  # the context-utilization grid, in tokens

    def label(self, k: float) -> str:
        """``1`` -> ``"1W"``, ``0.5`` -> ``"0.5W"``."""
        return f"{int(k) if float(k).is_integer() else k}W"


@dataclass(frozen=True)
class OutputSpec:
    """How the harness treats one metric output, or a family of them.

    ``key`` is an output name or a glob pattern (``"ppl@*W"`` covers ``ppl@1W``, ``ppl@20W``).
    A family member's *x* is what follows ``@`` in its name (``"20W"``, ``"<=W"``).

    - ``better``: ``"lower"`` or ``"higher"`` is better (the leaderboard marks the best row
      and ties; early stopping watches in that direction), or ``None``.
    - ``leaderboard``: the outputs are leaderboard row keys (JSON, CSV).
    - ``table``: which members are columns of the leaderboard's table and markdown: ``"all"``,
      ``"last"`` (the largest x), a tuple of x labels (``("1W", "20W")``), or ``None``.
    - ``table_modes``: only in tables of these evaluation modes (``None``: every mode).
    - ``checkpoint``: recorded at every evaluated checkpoint (values and series).
    - ``header``: the table header, ``{x}`` replaced by the member's x (default: the key).
    - ``percent``: shown x 100 in tables; ``digits``: decimals shown.
    - ``note``: one sentence for the table's caption when the column is shown.
    - ``reference``: draw these values as a grey reference line, labelled ``label``, on the
      plot of that kind (a :class:`PlotSpec` ``kind``), at x = the member's multiple of W.
    - ``status``: which members ``lengen status`` (and the report's run summaries) show as a
      run's latest values: ``"all"``, ``"last"``, a tuple of x labels, or ``None``.
    """

    key: str
    better: str | None = None
    leaderboard: bool = False
    table: str | tuple[str, ...] | None = None
    table_modes: tuple[str, ...] | None = None
    checkpoint: bool = False
    header: str | None = None
    percent: bool = False
    digits: int = 2
    note: str = ""
    reference: str | None = None
    label: str | None = None
    status: str | tuple[str, ...] | None = None

    def __post_init__(self):
        if self.better not in (None, "lower", "higher"):
            raise ValueError(f"OutputSpec({self.key!r}).better must be 'lower', 'higher' or None, not {self.better!r}")
        for name in ("table", "status"):
            value = getattr(self, name)
            if not (value is None or value in ("all", "last") or isinstance(value, tuple)):
                raise ValueError(f"OutputSpec({self.key!r}).{name} must be 'all', 'last', a tuple of x labels or None")

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.key)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OutputSpec":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("table", "table_modes", "status"):
            if isinstance(known.get(k), list):
                known[k] = tuple(known[k])
        return cls(**known)


def output_x(name: str) -> str:
    """The x of a family member: ``"ppl@20W"`` -> ``"20W"``; ``""`` without ``@``."""
    return name.partition("@")[2]


def x_multiple(x: str) -> float | None:
    """``"20W"`` -> 20.0, ``"0.5W"`` -> 0.5; None for anything else (``"<=W"``)."""
    m = re.fullmatch(r"([\d.]+)W", x)
    try:
        return float(m.group(1)) if m else None
    except ValueError:
        return None


@dataclass(frozen=True)
class PlotSpec:
    """A plot drawn from a :class:`Series` output: one curve per (architecture, mode) with its
    interval band, x in multiples of W on a log scale, W marked. ``kind`` is its name for
    ``lengen plot --kind``; the run writes it as ``filename``. ``log_y`` for a log y axis;
    ``primary``: the plot ``lengen plot`` draws when no kind is given."""

    series: str
    kind: str
    filename: str
    xlabel: str = "multiples of the training window W"
    ylabel: str = ""
    title: str = ""
    log_y: bool = False
    primary: bool = False

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PlotSpec":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class Metric(ABC):
    """Base class of metric plugins."""

    description: ClassVar[str] = ""
    Config: ClassVar[type[MetricConfig]] = MetricConfig
    version: ClassVar[str] = "1"
    #: annotation names the metric needs; without them it is skipped (and says so)
    requires: ClassVar[tuple[str, ...]] = ()
    #: evaluation modes whose scores the metric reads (``nonoverlapping`` has no positions)
    modes: ClassVar[tuple[str, ...]] = ("full", "window")
    #: outputs and their best values on perfect predictions (checked by ``lengen check --metric``)
    perfect: ClassVar[dict[str, float]] = {}
    #: how the leaderboard, checkpoints and plots treat the outputs (undeclared ones are kept
    #: in the record only)
    outputs: ClassVar[tuple[OutputSpec, ...]] = ()
    #: plots drawn from the metric's series
    plots: ClassVar[tuple[PlotSpec, ...]] = ()

    @abstractmethod
    def compute(self, scores: Scores, config: MetricConfig, ctx: MetricContext) -> dict[str, Value | Series]:
        """Named values and series computed from ``scores``."""

    def annotate(self, corpus: "Corpus", sequences, config: MetricConfig) -> dict[str, Any]:
        """Optional: per-token annotations this metric derives from the corpus (e.g. the NLL of a
        reference model fit on the training split), arrays shaped like ``sequences`` (the
        evaluation sequences ``[N, L + 1]``, whose first column is context only). Called once
        per run, before evaluation; the results join the dataset's annotations."""
        return {}

    def example_inputs(self, n: int, length: int, rng) -> tuple[dict[str, Any], dict]:
        """Optional: plausible annotations ``[n, length]`` and corpus ``info`` for the metric's
        ``requires``, so that ``lengen check --metric`` can run it without a dataset."""
        return {}, {}


def jsonable(obj: Any) -> Any:
    """Metric results as plain JSON types (NaN and infinities become null)."""
    if isinstance(obj, (Value, Series)):
        return jsonable(obj.as_dict())
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
