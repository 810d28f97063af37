"""The real-text dataset plugins: ``text``, ``jsonl``, ``parquet`` and ``hf``.

Each plugin only says where its documents come from (a :class:`Source`); one pipeline
turns documents into a :class:`~lengen.api.Corpus`:

1. documents: train and eval from separate files/splits, or a deterministic document-level
   holdout from a single source; optional ``train_docs`` / ``eval_docs`` limits;
2. the tokenizer of the suite's ``[tokenizer]`` table, trained on the training split only;
3. encoding, with an optional separator token starting each document (``Split.doc_starts``
   keeps the boundaries either way);
4. hygiene: the share of evaluation word 13-grams and lines found in the training split;
5. the cache: everything above is stored under ``<cache_dir>/text/<key>``, keyed by the
   data's content hashes (or the hub dataset's fingerprint) and every setting, so a second
   load reads arrays and tokenizes nothing (``corpus.info["cache"] == "hit"``).
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from lengen.api import Corpus, DataContext, Dataset, DatasetConfig, Split, config_hash
from lengen.errors import ConfigError
from lengen_text import cache, hygiene
from lengen_text import documents as D
from lengen_text import tokenize as T

#: settings that change neither the tokens nor the measured overlap (kept out of cache keys)
NOT_IN_KEY = {"overlap_warn", "probe_timeout"}
#: settings that change the measured overlap but not the tokens (kept out of fingerprints)
NOT_IN_FINGERPRINT = NOT_IN_KEY | {"overlap_ngram", "overlap_min_line"}

Paths = str | list[str]
Rule = Literal["wikitext", "blank_lines", "regex"]


class TextConfigBase(DatasetConfig):
    """Settings every real-text dataset shares."""

    doc_regex: str | None = Field(None, description="documents = 'regex': a document starts at each match "
                                                    "(multi-line: ^ matches at line starts)")
    separator: str | None = Field(None, description="a special token that starts every document, e.g. "
                                                    "'<|endoftext|>' (default: none)")
    holdout: Literal["random", "tail"] = Field(
        "random", description="no eval source: hold out a seeded random share of the documents, or the last ones")
    holdout_fraction: float = Field(0.1, gt=0, lt=1, description="share of documents held out for evaluation")
    train_docs: int | None = Field(None, gt=0, description="use only the first N training documents")
    eval_docs: int | None = Field(None, gt=0, description="use only the first N evaluation documents")
    overlap_ngram: int = Field(13, ge=1, description="hygiene: n of the word n-grams compared")
    overlap_min_line: int = Field(40, ge=1, description="hygiene: shortest line (characters) compared")
    overlap_warn: float = Field(0.05, ge=0, le=1, description="hygiene: warn when a shared share exceeds this")

    @field_validator("doc_regex")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v, re.MULTILINE)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _regex_with_rule(self):
        rule = getattr(self, "documents", None)
        if rule == "regex" and not self.doc_regex:
            raise ValueError("documents = 'regex' needs doc_regex, e.g. doc_regex = '^CHAPTER '")
        if self.doc_regex and rule != "regex":
            raise ValueError(f"doc_regex is used only with documents = 'regex' (documents is {rule!r})")
        return self


class TextFilesConfig(TextConfigBase):
    train: Paths = Field(description="training files: a path or glob, or a list (relative to --data-dir)")
    eval: Paths | None = Field(None, description="evaluation files (default: hold out documents of train)")
    documents: Literal["file"] | Rule = Field(
        "file", description="file (one document per file), wikitext (' = Title = ' headings), blank_lines or regex")
    encoding: str = "utf-8"


class TableFilesConfig(TextConfigBase):
    train: Paths = Field(description="training files: a path or glob, or a list (relative to --data-dir)")
    eval: Paths | None = Field(None, description="evaluation files (default: hold out documents of train)")
    text_column: str = Field("text", description="the column that holds the text")
    documents: Literal["row"] | Rule = Field(
        "row", description="row (one document per row), or rows joined as lines and split by wikitext, "
                           "blank_lines or regex")


class HubConfig(TextConfigBase):
    path: str = Field(description="hub dataset, e.g. 'wikitext' (or a local dataset folder)")
    name: str | None = Field(None, description="its configuration, e.g. 'wikitext-103-raw-v1'")
    train_split: str = "train"
    eval_split: str | None = Field("test", description="evaluation split (none: hold out documents of train)")
    text_column: str = "text"
    revision: str | None = Field(None, description="a commit or tag of the dataset (pin it for reproducibility)")
    documents: Literal["row"] | Rule = Field(
        "row", description="row (one document per row), or rows joined as lines and split by wikitext "
                           "(use it for wikitext-*, whose rows are lines), blank_lines or regex")
    probe_timeout: float = Field(3.0, gt=0, le=60, description="seconds to wait for the hub before going offline")


# ---------------------------------------------------------------------------------------
# sources


class Source(ABC):
    """Where documents come from. ``identity`` must change whenever the documents would."""

    has_eval: bool = True

    @abstractmethod
    def identity(self) -> dict:
        """What identifies the documents (file hashes, a hub dataset's fingerprint)."""

    @abstractmethod
    def train_docs(self) -> list[str]:
        """The training documents."""

    @abstractmethod
    def eval_docs(self) -> list[str] | None:
        """The evaluation documents, or None to hold out some training documents."""


class FileSource(Source):
    def __init__(self, cfg, ctx: DataContext, read_rows=None):
        self.cfg, self.data_dir, self.read_rows = cfg, ctx.data_dir, read_rows
        self.train_files = D.resolve_files(D.as_list(cfg.train), ctx.data_dir, "train")
        self.eval_files = D.resolve_files(D.as_list(cfg.eval), ctx.data_dir, "eval") if cfg.eval else []
        self.has_eval = bool(self.eval_files)

    def identity(self) -> dict:
        return {"train": D.files_identity(self.train_files, self.data_dir),
                "eval": D.files_identity(self.eval_files, self.data_dir)}

    def _docs(self, files: list[Path]) -> list[str]:
        cfg, docs = self.cfg, []
        for f in files:
            if self.read_rows is None:
                docs += D.split_documents(D.read_text_file(f, cfg.encoding), cfg.documents, cfg.doc_regex)
            else:
                docs += D.rows_to_documents(self.read_rows(f, cfg.text_column), cfg.documents, cfg.doc_regex)
        return docs

    def train_docs(self) -> list[str]:
        return self._docs(self.train_files)

    def eval_docs(self) -> list[str] | None:
        return self._docs(self.eval_files) if self.has_eval else None


class HubSource(Source):
    def __init__(self, cfg: HubConfig, ctx: DataContext):
        from lengen_text import hub

        self.cfg = cfg
        local = Path(cfg.path).expanduser()
        if ctx.data_dir is not None and not local.is_absolute() and (Path(ctx.data_dir) / local).is_dir():
            local = Path(ctx.data_dir) / local
        path = str(local) if local.is_dir() else cfg.path
        self.why = None if local.is_dir() else hub.hub_status(cfg.probe_timeout)
        self.train = hub.load_split(path, cfg.name, cfg.train_split, cfg.revision, unreachable=self.why)
        self.eval = (hub.load_split(path, cfg.name, cfg.eval_split, cfg.revision, unreachable=self.why)
                     if cfg.eval_split else None)
        self.has_eval = self.eval is not None
        for split, ds in ((cfg.train_split, self.train), (cfg.eval_split, self.eval)):
            if ds is not None and cfg.text_column not in ds.column_names:
                raise ConfigError(f"hf dataset {cfg.path!r} split {split!r} has no column {cfg.text_column!r} "
                                  f"(columns: {', '.join(ds.column_names)}); set data.text_column")

    def identity(self) -> dict:
        c = self.cfg
        return {"path": c.path, "name": c.name, "revision": c.revision, "train_split": c.train_split,
                "eval_split": c.eval_split, "train_fingerprint": self.train._fingerprint,
                "train_rows": self.train.num_rows,
                "eval_fingerprint": self.eval._fingerprint if self.eval is not None else None,
                "eval_rows": self.eval.num_rows if self.eval is not None else None}

    def _docs(self, ds) -> list[str]:
        rows = [r for r in ds[self.cfg.text_column][:] if r is not None]
        return D.rows_to_documents(rows, self.cfg.documents, self.cfg.doc_regex)

    def train_docs(self) -> list[str]:
        return self._docs(self.train)

    def eval_docs(self) -> list[str] | None:
        return self._docs(self.eval) if self.eval is not None else None


# ---------------------------------------------------------------------------------------
# the pipeline


class _Decode:
    """``Corpus.decode``: token ids -> text (the tokenizer is read on first use)."""

    def __init__(self, tok=None, path: Path | None = None):
        self.tok, self.path = tok, path

    def tokenizer(self):
        if self.tok is None:
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(self.path))
        return self.tok

    def __call__(self, ids) -> str:
        return self.tokenizer().decode([int(i) for i in ids], skip_special_tokens=False)


class _Encode(_Decode):
    """``Corpus.encode``: text -> token ids (no special tokens added; the tokenizer is read on
    first use)."""

    def __call__(self, text: str) -> list[int]:
        return list(self.tokenizer().encode(text, add_special_tokens=False).ids)


def build_corpus(dataset: str, version: str, cfg: TextConfigBase, ctx: DataContext, src: Source,
                 tcfg: T.TokenizerConfig) -> Corpus:
    seeded = not src.has_eval and cfg.holdout == "random"
    key_inputs = {
        "dataset": dataset, "version": version, "source": src.identity(),
        "config": cfg.model_dump(mode="json", exclude=NOT_IN_KEY),
        "tokenizer": T.identity(tcfg, ctx.data_dir),
        "seed": ctx.seed if seeded else None,
    }
    key = config_hash(key_inputs)
    hit = cache.load(ctx.cache_dir, key)
    if hit is not None:
        meta, arrays, tok_path = hit
        decode, encode = _Decode(path=tok_path), _Encode(path=tok_path)
    else:
        meta, arrays, tok = _build(dataset, cfg, ctx, src, tcfg, key_inputs, seeded)
        cache.save(ctx.cache_dir, key, meta, arrays, tok.to_str(), meta["vocab_size"])
        decode, encode = _Decode(tok=tok), _Encode(tok=tok)
    train = Split(arrays["train_tokens"], arrays["train_doc_starts"])
    ev = Split(arrays["eval_tokens"], arrays["eval_doc_starts"])
    info = {**meta["info"], "cache": "hit" if hit is not None else "miss", "cache_key": key,
            "eval_documents": _eval_doc_counts(ev, ctx.eval_length)}
    hygiene.check(info["overlap"], cfg.overlap_warn, f"dataset {dataset!r}")
    return Corpus(train=train, eval=ev, vocab_size=meta["vocab_size"], fingerprint=meta["fingerprint"],
                  tokenizer=meta["tokenizer"], info=info, decode=decode, encode=encode)


def _build(dataset, cfg, ctx, src: Source, tcfg, key_inputs, seeded):
    timing = {}
    say = ctx.progress or (lambda message: None)
    t0 = time.perf_counter()
    say(f"{dataset}: reading documents")
    train_docs, eval_docs = src.train_docs(), src.eval_docs()
    if eval_docs is None:
        train_docs, eval_docs = D.holdout(train_docs, cfg.holdout_fraction, cfg.holdout, ctx.seed)
        split = f"holdout {cfg.holdout} {cfg.holdout_fraction:g} of the documents" + (
            f" (data_seed {ctx.seed})" if seeded else "")
    else:
        split = "separate sources"
    train_docs = train_docs[:cfg.train_docs] if cfg.train_docs else train_docs
    eval_docs = eval_docs[:cfg.eval_docs] if cfg.eval_docs else eval_docs
    for what, docs in (("training", train_docs), ("evaluation", eval_docs)):
        if not docs:
            raise ConfigError(f"dataset {dataset!r}: the {what} split has no documents (only blank text); "
                              "check data.train / data.eval and data.documents")
    timing["read"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"{dataset}: building the {tcfg.kind} tokenizer")
    tok = T.build(tcfg, train_docs, cfg.separator, cache_dir=ctx.cache_dir, data_dir=ctx.data_dir,
                  train_digest=D.docs_digest(train_docs))
    sep_id = T.separator_id(tok, cfg.separator)
    timing["tokenizer"] = time.perf_counter() - t0
    say(f"{dataset}: tokenizing {len(train_docs) + len(eval_docs):,} documents")
    tr_tokens, tr_starts, tr_s = T.encode_documents(tok, train_docs, sep_id)
    ev_tokens, ev_starts, ev_s = T.encode_documents(tok, eval_docs, sep_id)
    timing["encode"] = tr_s + ev_s
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    top = max(int(tr_tokens.max(initial=0)), int(ev_tokens.max(initial=0)))
    if top >= vocab_size:  # a tokenizer.json whose ids exceed its own vocabulary
        raise ConfigError(f"[tokenizer]: token id {top} >= the vocabulary size {vocab_size}; the tokenizer is "
                          "inconsistent, use another one")

    t0 = time.perf_counter()
    say(f"{dataset}: measuring train/eval overlap")
    overlap = hygiene.measure(train_docs, eval_docs, n=cfg.overlap_ngram, min_line_chars=cfg.overlap_min_line)
    timing["overlap"] = time.perf_counter() - t0

    desc = T.describe(tok, tcfg, cfg.separator, sep_id)
    tr_bytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in train_docs)
    ev_bytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in eval_docs)
    fp_inputs = {**key_inputs, "config": {k: v for k, v in key_inputs["config"].items() if k not in NOT_IN_FINGERPRINT},
                 "tokenizer": desc["hash"]}
    info = {
        "source": _summarise(key_inputs["source"]),
        "split": split,
        "documents": {"rule": cfg.documents, "train": len(tr_starts), "eval": len(ev_starts)},
        "bytes": {"train": tr_bytes, "eval": ev_bytes},
        "tokens": {"train": int(len(tr_tokens)), "eval": int(len(ev_tokens))},
        "bytes_per_token": {"train": round(tr_bytes / max(1, len(tr_tokens)), 4),
                            "eval": round(ev_bytes / max(1, len(ev_tokens)), 4)},
        "overlap": overlap,
        "build_s": {k: round(v, 3) for k, v in timing.items()},
    }
    meta = {"fingerprint": config_hash(fp_inputs), "vocab_size": vocab_size, "tokenizer": desc, "info": info}
    arrays = {"train_tokens": tr_tokens, "train_doc_starts": tr_starts,
              "eval_tokens": ev_tokens, "eval_doc_starts": ev_starts}
    return meta, arrays, tok


def _summarise(identity: dict) -> dict:
    """The source's identity, with long file lists shortened for the record."""
    out = {}
    for k, v in identity.items():
        if isinstance(v, list) and len(v) > 8:
            out[k] = {"files": len(v), "bytes": sum(f["bytes"] for f in v),
                      "sha256": config_hash([f["sha256"] for f in v]), "first": v[0]["file"]}
        else:
            out[k] = v
    return out


def _eval_doc_counts(ev: Split, eval_length: int) -> dict:
    lengths = np.diff(np.append(ev.doc_starts, len(ev)))
    need = eval_length + 1
    return {"count": int(len(lengths)), "long_enough": int((lengths >= need).sum()), "need_tokens": int(need),
            "median_tokens": int(np.median(lengths)) if len(lengths) else 0,
            "packed_sequences": int(len(ev) // need)}


# ---------------------------------------------------------------------------------------
# the plugins


class _TextDataset(Dataset):
    version: ClassVar[str] = "1"
    name: ClassVar[str] = "?"

    @abstractmethod
    def source(self, config, ctx: DataContext) -> Source:
        """Where this dataset's documents come from."""

    def validate(self, config, ctx: DataContext) -> None:
        """Fail before any training: a bad [tokenizer] table, missing files, an unreachable hub."""
        T.parse_tokenizer(ctx.tokenizer)
        self.source(config, ctx)

    def load(self, config, ctx: DataContext) -> Corpus:
        tcfg = T.parse_tokenizer(ctx.tokenizer)  # a bad [tokenizer] table fails before any data is read
        return build_corpus(self.name, self.version, config, ctx, self.source(config, ctx), tcfg)


class TextFiles(_TextDataset):
    """Local text files or globs (relative to --data-dir)."""

    description = "Local text files; documents per file or split by a rule"
    Config = TextFilesConfig
    name = "text"

    def source(self, config, ctx):
        return FileSource(config, ctx)


class JsonlFiles(_TextDataset):
    """Local JSON-lines files, one object per line, with a text column."""

    description = "Local JSON-lines files with a text column"
    Config = TableFilesConfig
    name = "jsonl"

    def source(self, config, ctx):
        return FileSource(config, ctx, read_rows=D.read_jsonl_column)


class ParquetFiles(_TextDataset):
    """Local parquet files with a text column."""

    description = "Local parquet files with a text column"
    Config = TableFilesConfig
    name = "parquet"

    def source(self, config, ctx):
        return FileSource(config, ctx, read_rows=D.read_parquet_column)


class HubDataset(_TextDataset):
    """A Hugging Face hub dataset through ``datasets.load_dataset``."""

    description = "A Hugging Face hub dataset"
    Config = HubConfig
    name = "hf"

    def source(self, config, ctx):
        return HubSource(config, ctx)
