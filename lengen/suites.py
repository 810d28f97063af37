"""Benchmark suites: the schema of ``benchmarks.toml`` and its validation.

Every suite fixes what a comparison needs held equal: the dataset and its config, the
tokenizer, the training window W, the training recipe, the evaluation protocol, the model
size of each architecture and the seeds. Errors name the file, the line, the suite and the
key, and say what is expected.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from lengen.api import StrictConfig
from lengen.errors import ConfigError

MODES = ("full", "window", "nonoverlapping")


class EarlyStopping(StrictConfig):
    """Stop training when a checkpoint metric stops improving (in the direction its metric
    declares better)."""

    patience: int = Field(gt=0, description="checkpoints without an improvement of min_delta before stopping")
    min_delta: float = Field(0.0, ge=0, description="smallest change in the better direction that counts as an improvement")
    metric: str = Field(description="checkpoint output to watch (one a metric declares checkpoint=True with a direction)")


class TrainSpec(StrictConfig):
    """The training recipe (the same for every architecture in the suite)."""

    steps: int = Field(gt=0, description="optimizer steps")
    batch_size: int = Field(32, gt=0, description="windows per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    warmup: float = Field(0.02, ge=0, description="warmup: a fraction of steps if < 1, else steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    clip: float = Field(1.0, ge=0, description="gradient-norm clip (0: off)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that has it, fp32 on CPU")
    state_passing: bool = Field(
        False, description="carry state across consecutive training windows (architectures that support it)")
    doc_policy: Literal["auto", "reset", "packed"] = Field(
        "auto", description="with state passing: reset the state at document starts (equal-length documents) or "
                            "carry it across them (packed); auto: reset when possible")
    early_stopping: EarlyStopping | None = Field(None, description="needs eval.checkpoints >= 2")
    compile: bool = Field(False, description="train through torch.compile (measured in docs/performance.md; "
                                             "evaluation runs the model itself)")
    checkpoint_every: int = Field(0, ge=0, description="save a training checkpoint every N steps, for "
                                                       "`lengen run --resume` (0: only on Ctrl-C / SIGTERM)")

    def warmup_steps(self) -> int:
        return int(round(self.warmup * self.steps)) if self.warmup < 1 else int(self.warmup)


class EvalSpec(StrictConfig):
    """The evaluation protocol."""

    length: float = Field(20, description="evaluation sequence length, in multiples of W")
    positions: list[float] = Field([1, 2, 5, 10, 20], description="positions k x W to report")
    modes: list[Literal["full", "window", "nonoverlapping"]] = Field(["full"], min_length=1)
    stride: int = Field(16, gt=0, description="window mode: predictions scored per window of W (the seeds' K = S)")
    baseline: Literal["full", "window", "nonoverlapping"] | None = Field(
        None, description="mode the others are compared with on the same tokens (the seeds' SW: window)")
    lengths: list[float] = Field([0.5 * i for i in range(1, 21)],
                                 description="perplexity-vs-length grid, multiples of W")
    contexts: list[float] = Field([], description="context-utilization grid, multiples of W (e.g. [0.25, 1, 5, 20])")
    checkpoints: int = Field(0, ge=0, description="evaluate this many checkpoints spread over training (0: only the end)")
    sequences: int = Field(64, gt=0, description="evaluation sequences")
    batch_size: int = Field(16, gt=0, description="evaluation sequences per forward batch")
    chunk: int | None = Field(None, gt=0, description="tokens per forward when a stateful model streams a sequence "
                                                       "with its state carried (equal to one pass; bounds memory); "
                                                       "default: W")
    bucket: int = Field(16, gt=0, description="tokens in each position bucket, ending at k x W")
    calibration: int = Field(16, ge=1, description="sequences of the training split given to architectures that "
                                                   "calibrate before evaluation (Architecture.calibrate)")
    doc_policy: Literal["documents", "packed"] = Field(
        "documents", description="evaluation sequences: the start of each long-enough document, or slices of "
                                 "the packed stream")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for intervals")
    confidence: float = Field(0.95, gt=0, lt=1)

    @field_validator("length")
    @classmethod
    def _length_at_least_w(cls, v: float) -> float:
        if v < 1:
            raise ValueError(
                f"evaluation length {v:g} x W is shorter than the training window; use length >= 1")
        return v

    @field_validator("positions", "lengths", "contexts")
    @classmethod
    def _positive_multiples(cls, v: list[float], info) -> list[float]:
        if any(p <= 0 for p in v) or (info.field_name == "positions" and not v):
            raise ValueError(f"{info.field_name} must be a list of positive multiples of W")
        return sorted(set(v))

    @field_validator("modes")
    @classmethod
    def _unique_modes(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    def tokens(self, multiples: list[float], window: int) -> list[int]:
        """Multiples of W as token counts (at least 1, no duplicates)."""
        return sorted({max(1, int(round(m * window))) for m in multiples})


class Suite(StrictConfig):
    """One named benchmark suite."""

    name: str
    description: str = ""
    dataset: str = Field("synthetic", description="dataset plugin name")
    data: dict[str, Any] = Field(default_factory=dict, description="the dataset's config")
    data_seed: int = Field(0, description="seed of the data (fixed across training seeds)")
    tokenizer: dict[str, Any] | None = Field(None, description="tokenizer settings (real text)")
    window: int = Field(description="training window W in tokens")
    seeds: list[int] = Field([0], description="training seeds (integers >= 0)")
    archs: list[str] = Field(default_factory=list, description="architectures run when none is named")
    train: TrainSpec
    eval: EvalSpec = Field(default_factory=EvalSpec)
    arch: dict[str, dict[str, Any]] = Field(default_factory=dict, description="config per architecture")
    metrics: dict[str, dict[str, Any]] = Field(default_factory=dict, description="config per metric")

    @field_validator("window")
    @classmethod
    def _window_positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"window must be a positive number of tokens, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Suite":
        too_far = [f"{p:g}" for p in self.eval.positions if p > self.eval.length]
        if too_far:
            raise ValueError(
                f"eval.positions [{', '.join(too_far)}] lie beyond eval.length = {self.eval.length:g} x W; "
                "raise eval.length or drop them")
        if self.eval.bucket > self.window:
            raise ValueError(f"eval.bucket = {self.eval.bucket} exceeds the window W = {self.window}")
        if self.eval.stride > self.window:
            raise ValueError(f"eval.stride = {self.eval.stride} exceeds the window W = {self.window}")
        if self.eval.baseline and self.eval.baseline not in self.eval.modes:
            raise ValueError(f"eval.baseline = {self.eval.baseline!r} is not one of eval.modes {self.eval.modes}")
        if self.train.early_stopping and self.eval.checkpoints < 2:
            raise ValueError("train.early_stopping needs eval.checkpoints >= 2 to watch")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be integers >= 0, got {self.seeds}")
        return self

    @property
    def eval_tokens(self) -> int:
        """Predicted tokens per evaluation sequence, L = length x W."""
        return int(round(self.eval.length * self.window))

    def arch_config(self, name: str) -> dict[str, Any]:
        """This suite's settings for an architecture: ``arch.<name>``, else the table of
        its family (the part of the name before the first ``-``: ``ttt`` for ``ttt-mlp``)."""
        if name in self.arch:
            return dict(self.arch[name])
        family = name.split("-", 1)[0]
        return dict(self.arch.get(family, {}))


# ---------------------------------------------------------------------------------------
# loading


def parse_tables(text: str, source: str = "benchmarks.toml") -> dict[str, Any]:
    """The raw suite tables of a benchmarks.toml text (TOML syntax checked, not the schema)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        where = f"{source}:{line.group(1)}" if line else source
        raise ConfigError(f"{where}: malformed TOML: {exc}; fix the syntax there") from None


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read benchmarks file {str(path)!r}: {exc.strerror}") from None


def parse_suites(text: str, source: str = "benchmarks.toml") -> dict[str, Suite]:
    """Parse and validate every suite in a benchmarks.toml text."""
    raw = parse_tables(text, source)
    suites = {}
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"{source}:{line_of(text, [], name)}: top-level key {name!r} is not a suite table; "
                f"write suites as [name] tables")
        suites[name] = validate_suite(name, table, source=source, text=text)
    return suites


def load_suites_file(path: str | Path) -> dict[str, Suite]:
    return parse_suites(read_text(path), source=str(path))


def validate_suite(name: str, table: dict[str, Any], *, source: str = "benchmarks.toml",
                   text: str | None = None) -> Suite:
    try:
        return Suite(name=name, **{k: v for k, v in table.items() if k != "name"})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        line = line_of(text, [name] + loc[:-1], loc[-1] if loc else None) if text else None
        where = f"{source}:{line}" if line else source
        table_name = ".".join([name] + loc[:-1])
        key = loc[-1] if loc else "?"
        if err["type"] == "extra_forbidden":
            known = _known_keys(loc[:-1])
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(known)
            msg = f"unknown key {key!r} in [{table_name}]; {hint}"
        elif err["type"] == "missing":
            msg = f"[{table_name}] is missing the required key {key!r}"
        elif not loc:  # a check across keys
            msg = _clean(err["msg"])
        else:
            got = err.get("input")
            text_msg = _clean(err["msg"])
            got = f" (got {got!r})" if got is not None and not isinstance(got, dict) and "got" not in text_msg else ""
            msg = f"[{table_name}] {key}: {text_msg}{got}"
        raise ConfigError(f"{where}: suite {name!r}: {msg}") from None


def _known_keys(path: list[str]) -> list[str]:
    model: Any = Suite
    for part in path:
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = field.annotation
    fields = getattr(model, "model_fields", {})
    return sorted(k for k in fields if k != "name")


def _clean(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def line_of(text: str | None, table: list[str], key: str | None) -> int | None:
    """Best-effort line number of ``key`` inside table ``[a.b]`` (or of the table)."""
    if not text:
        return None
    lines = text.splitlines()
    header = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(re.escape(t) for t in table) + r"\s*\]") if table else None
    start = 0
    if header is not None:
        for i, line in enumerate(lines):
            if header.match(line):
                start = i
                break
        else:
            # dotted keys: [suite] ... train.lr = 1
            if key and len(table) > 1:
                dotted = re.compile(r"^\s*" + re.escape(".".join(table[1:] + [key])) + r"\s*=")
                for i, line in enumerate(lines):
                    if dotted.match(line):
                        return i + 1
            header = re.compile(r"^\s*\[\s*" + re.escape(table[0]) + r"\s*\]")
            for i, line in enumerate(lines):
                if header.match(line):
                    start = i
                    break
    if key is None:
        return start + 1
    pat = re.compile(r"^\s*\"?" + re.escape(key) + r"\"?\s*=")
    for i in range(start, len(lines)):
        if i > start and lines[i].lstrip().startswith("[") and header is not None:
            break
        if pat.match(lines[i]):
            return i + 1
    return start + 1 if table else None


def apply_overrides(table: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` settings (TOML values) from the command line. TOML has no
    null: ``KEY=null`` (or ``none``) resets the key to its default, removing it from the table."""
    out = _deepcopy(table)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=200")
        try:
            parsed = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value.strip()  # a bare word: take it as a string
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a table")
        if isinstance(parsed, str) and parsed.lower() in ("null", "none") and value.strip() == parsed:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = parsed
    return out


def _deepcopy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj
