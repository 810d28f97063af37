"""Tokenizers (through the ``tokenizers`` library) selected by a suite's ``[tokenizer]`` table.

``kind``:

* ``bpe``: byte-level BPE (GPT-2's pre-tokenization and byte alphabet) trained on the
  training split only, ``vocab_size`` tokens (fewer if the text has fewer merges);
* ``char``: one token per character seen in the training split, plus ``<unk>``;
* ``byte``: one token per UTF-8 byte, id = byte value (256 tokens);
* ``file``: any ``tokenizer.json`` (e.g. GPT-2's), ``path`` relative to ``--data-dir``;
* ``pretrained``: ``tokenizer.json`` of a hub repository (``name = "gpt2"``), from the
  local Hugging Face cache when the hub is unreachable.

The document separator (``data.separator``), when set, is a special token.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError, model_validator

from lengen.api import StrictConfig, config_hash
from lengen.errors import ConfigError

#: bump when the way a tokenizer is trained or applied changes: cached corpora become stale
RECIPE_VERSION = "1"
UNK = "<unk>"
DEFAULT_BPE_VOCAB = 8192


class TokenizerConfig(StrictConfig):
    """The suite's ``[name.tokenizer]`` table."""

    kind: Literal["bpe", "char", "byte", "file", "pretrained"] = Field(
        "bpe", description="bpe (trained on the training split), char, byte, file (a tokenizer.json) or "
                           "pretrained (a hub repository's tokenizer.json)")
    vocab_size: int | None = Field(None, ge=257, description=f"bpe: vocabulary size (default {DEFAULT_BPE_VOCAB})")
    min_frequency: int = Field(2, ge=1, description="bpe: a pair must occur this often to be merged")
    path: str | None = Field(None, description="file: tokenizer.json path, relative to --data-dir")
    name: str | None = Field(None, description="pretrained: hub repository, e.g. 'gpt2'")
    revision: str | None = Field(None, description="pretrained: a commit or tag (pin it for reproducibility)")

    @model_validator(mode="after")
    def _fields_match_kind(self) -> "TokenizerConfig":
        if self.kind == "file" and not self.path:
            raise ValueError("kind = 'file' needs path = '.../tokenizer.json'")
        if self.kind == "pretrained" and not self.name:
            raise ValueError("kind = 'pretrained' needs name = '<hub repository>', e.g. 'gpt2'")
        if self.vocab_size is not None and self.kind != "bpe":
            raise ValueError(f"vocab_size applies to kind = 'bpe' only (kind is {self.kind!r}); remove it")
        if self.path and self.kind != "file":
            raise ValueError(f"path applies to kind = 'file' only (kind is {self.kind!r})")
        if (self.name or self.revision) and self.kind != "pretrained":
            raise ValueError(f"name and revision apply to kind = 'pretrained' only (kind is {self.kind!r})")
        return self

    @property
    def bpe_vocab(self) -> int:
        return self.vocab_size or DEFAULT_BPE_VOCAB


def parse_tokenizer(table: dict | None) -> TokenizerConfig:
    """The suite's tokenizer table, validated (``None``: the default, a BPE of 8192)."""
    try:
        return TokenizerConfig(**(table or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            import difflib

            close = difflib.get_close_matches(key, list(TokenizerConfig.model_fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(TokenizerConfig.model_fields)
            raise ConfigError(f"[tokenizer]: unknown key {key!r}; {hint}") from None
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        got = f" (got {got!r})" if key and got is not None and not isinstance(got, dict) else ""
        raise ConfigError(f"[tokenizer]{' ' + key if key else ''}: {msg}{got}") from None


def identity(tcfg: TokenizerConfig, data_dir: Path | None) -> dict:
    """What decides the tokenizer before it is built (with the training text): the
    settings, and for a tokenizer.json file its content hash."""
    out: dict[str, Any] = {"recipe": RECIPE_VERSION, **tcfg.model_dump(mode="json")}
    if tcfg.kind == "file":
        out["sha256"] = hashlib.sha256(resolve_path(tcfg.path, data_dir).read_bytes()).hexdigest()
    return out


def resolve_path(path: str, data_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    full = p if p.is_absolute() else (Path(data_dir) if data_dir is not None else Path.cwd()) / p
    if not full.is_file():
        raise ConfigError(f"[tokenizer] path: no file {str(full)!r}; give a tokenizer.json path "
                          "(relative to --data-dir) or use kind = 'bpe'")
    return full


# ---------------------------------------------------------------------------------------
# building


def build(tcfg: TokenizerConfig, train_docs: list[str], separator: str | None, *, cache_dir: Path,
          data_dir: Path | None, train_digest: str):
    """The tokenizer for ``tcfg`` (trained ones are cached by training text and settings)."""
    from tokenizers import Tokenizer

    if tcfg.kind == "byte":
        tok = _byte_tokenizer()
    elif tcfg.kind == "file":
        path = resolve_path(tcfg.path, data_dir)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"[tokenizer] path: {path} is not a tokenizer.json the tokenizers library can read "
                              f"({type(exc).__name__}: {exc})") from None
    elif tcfg.kind == "pretrained":
        from lengen_text.hub import pretrained_tokenizer_file

        tok = Tokenizer.from_file(pretrained_tokenizer_file(tcfg.name, tcfg.revision))
    else:
        key = config_hash({"tokenizer": identity(tcfg, data_dir), "train": train_digest, "separator": separator})
        path = Path(cache_dir) / "tokenizers" / f"{tcfg.kind}-{key}.json"
        if path.is_file():
            return Tokenizer.from_file(str(path))
        tok = train_bpe(train_docs, tcfg, separator) if tcfg.kind == "bpe" else _char_tokenizer(train_docs)
        _atomic_write(path, tok.to_str())
    return tok


def train_bpe(train_docs: list[str], tcfg: TokenizerConfig, separator: str | None):
    """Byte-level BPE trained on the training documents (fed line by line, which lets the
    trainer count words in parallel; the merges are what the text's words give)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tcfg.bpe_vocab, min_frequency=tcfg.min_frequency, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[separator] if separator else [])
    tok.train_from_iterator((line for d in train_docs for line in d.splitlines(keepends=True)), trainer)
    return tok


def _char_tokenizer(train_docs: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars: set[str] = set()
    for d in train_docs:
        chars.update(d)
    chars.discard(UNK)
    vocab = {UNK: 0, **{c: i + 1 for i, c in enumerate(sorted(chars))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m:.)"), behavior="isolated")  # Oniguruma: (?m) = dot-all
    tok.decoder = decoders.Fuse()
    return tok


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}  # id == byte value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def separator_id(tok, separator: str | None) -> int | None:
    """The separator's id, added as a special token when the vocabulary lacks it."""
    if not separator:
        return None
    tid = tok.token_to_id(separator)
    if tid is None:
        tok.add_special_tokens([separator])
        tid = tok.token_to_id(separator)
    return int(tid)


def describe(tok, tcfg: TokenizerConfig, separator: str | None, sep_id: int | None) -> dict:
    """Name, settings and hashes of a tokenizer, for ``Corpus.tokenizer``."""
    vocab = tok.get_vocab(with_added_tokens=True)
    vocab_blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    name = {"bpe": f"byte-level BPE {tcfg.bpe_vocab}", "char": "char", "byte": "byte",
            "file": f"file {Path(tcfg.path or '').name}", "pretrained": f"pretrained {tcfg.name}"}[tcfg.kind]
    return {
        "name": name,
        "kind": tcfg.kind,
        "settings": tcfg.model_dump(mode="json", exclude_none=True),
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "vocab_hash": hashlib.sha256(vocab_blob.encode()).hexdigest()[:16],
        "hash": hashlib.sha256(tok.to_str().encode()).hexdigest()[:16],
        "separator": separator,
        "separator_id": sep_id,
        "library": "tokenizers " + _tokenizers_version(),
    }


def _tokenizers_version() -> str:
    import tokenizers

    return tokenizers.__version__


# ---------------------------------------------------------------------------------------
# encoding


def encode_documents(tok, docs: list[str], sep_id: int | None, *, batch_chars: int = 1 << 24):
    """Token stream and document starts of ``docs`` (each document encoded whole, in
    parallel batches; the separator, when given, starts every document).

    Returns ``tokens`` (int64), ``doc_starts`` (int64) and the seconds spent.
    """
    t0 = time.perf_counter()
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    sep = np.asarray([sep_id], dtype=np.int64) if sep_id is not None else None
    batch: list[str] = []
    size = 0

    def flush():
        for enc in tok.encode_batch_fast(batch, add_special_tokens=False):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if sep is not None:
                ids = np.concatenate([sep, ids])
            if len(ids):
                pieces.append(ids)
                lengths.append(len(ids))
        batch.clear()

    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= batch_chars:
            flush()
            size = 0
    if batch:
        flush()
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if lengths else np.zeros(0, np.int64)
    return tokens, starts, time.perf_counter() - t0


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
