"""From files and rows to documents, and the train/eval split.

A *document* is a string. Splitting rules cut a text into consecutive documents without
dropping any character between them (the trailing blank lines of a document stay with it),
so the concatenated documents reproduce the source text; whitespace-only documents (e.g.
the blank line before WikiText's first heading) are dropped. Line endings are normalised
to ``\\n``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from lengen.errors import ConfigError

#: a WikiText top-level heading line, `` = Title = `` (second-level ones are `` = = x = = ``)
WIKITEXT_HEADING = re.compile(r"^ = (?!=).*[^=] = *$")
#: a run of blank lines: a new paragraph starts where it ends
BLANK_RUN = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")

RULES_WHOLE = ("file", "row")


def split_documents(text: str, rule: str, regex: str | None = None) -> list[str]:
    """Cut ``text`` into documents by ``rule``.

    ``file`` / ``row``: the text is one document. ``wikitext``: a document starts at each
    top-level heading line `` = Title = `` that stands between blank lines (the form of
    WikiText's files and of the hub's ``wikitext`` rows). ``blank_lines``: a document
    starts after each run of blank lines. ``regex``: a document starts at each match of
    ``regex`` (multi-line mode: ``^`` matches at every line start).
    """
    if rule in RULES_WHOLE:
        return [text] if text.strip() else []
    if rule == "wikitext":
        starts = _wikitext_starts(text)
    elif rule == "blank_lines":
        starts = [m.end() for m in BLANK_RUN.finditer(text)]
    elif rule == "regex":
        if not regex:
            raise ConfigError("data.documents = 'regex' needs data.doc_regex, e.g. doc_regex = '^CHAPTER '")
        starts = [m.start() for m in re.finditer(regex, text, flags=re.MULTILINE)]
    else:  # the configs' Literal types make this unreachable
        raise ConfigError(f"unknown document rule {rule!r}; use file, row, wikitext, blank_lines or regex")
    bounds = sorted({0, *starts, len(text)})
    docs = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return [d for d in docs if d.strip()]


def _wikitext_starts(text: str) -> list[int]:
    starts, pos = [], 0
    lines = text.split("\n")
    offsets = []
    for line in lines:
        offsets.append(pos)
        pos += len(line) + 1
    for i, line in enumerate(lines):
        if (line.startswith(" = ") and WIKITEXT_HEADING.match(line)
                and (i == 0 or not lines[i - 1].strip())
                and (i + 1 == len(lines) or not lines[i + 1].strip())):
            starts.append(offsets[i])
    return starts


def join_rows(rows: list[str]) -> str:
    """Rows as one text (each row a line; rows that end with a newline keep just that one)."""
    return "".join(r if r.endswith("\n") else r + "\n" for r in rows)


def rows_to_documents(rows: list[str], rule: str, regex: str | None) -> list[str]:
    if rule == "row":
        return [r for r in rows if r.strip()]
    return split_documents(normalise_newlines(join_rows(rows)), rule, regex)


def normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


# ---------------------------------------------------------------------------------------
# files


def as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def resolve_files(patterns: list[str], data_dir: Path | None, what: str) -> list[Path]:
    """Existing files named by ``patterns`` (paths or globs; relative ones under
    ``data_dir``, else the working directory), in pattern order, each once."""
    base = Path(data_dir).expanduser() if data_dir is not None else Path.cwd()
    out: list[Path] = []
    for pattern in patterns:
        p = Path(pattern).expanduser()
        full = p if p.is_absolute() else base / p
        if glob.has_magic(str(pattern)):
            found = [Path(f) for f in sorted(glob.glob(str(full), recursive=True)) if Path(f).is_file()]
        else:
            found = [full] if full.is_file() else []
        if not found:
            hint = ("pass --data-dir DIR naming the folder that holds it" if data_dir is None
                    else "check the name, or pass the right --data-dir")
            raise ConfigError(f"data.{what}: no file matches {pattern!r} in {base}; {hint}")
        for f in found:
            if f not in out:
                out.append(f)
    return out


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def files_identity(files: list[Path], data_dir: Path | None) -> list[dict]:
    """What the data is, for cache keys and records: names (relative to the data folder
    when inside it), sizes and content hashes. Moving the folder keeps the identity."""
    base = Path(data_dir).expanduser().resolve() if data_dir is not None else Path.cwd().resolve()
    out = []
    for f in files:
        try:
            name = str(f.resolve().relative_to(base))
        except ValueError:
            name = f.name
        out.append({"file": name, "bytes": f.stat().st_size, "sha256": file_digest(f)})
    return out


def read_text_file(path: Path, encoding: str) -> str:
    data = path.read_bytes()
    nul = data.find(b"\0")
    if nul >= 0 and encoding.lower().replace("_", "-") not in ("utf-16", "utf-16-le", "utf-16-be", "utf-32"):
        raise ConfigError(f"{path}: binary data (a NUL byte at offset {nul}), not text; point data.train / "
                          "data.eval at text files (for parquet or jsonl, use those datasets)")
    try:
        return normalise_newlines(data.decode(encoding))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid {encoding} at byte {exc.start}; set data.encoding "
                          "(e.g. 'latin-1') or fix the file") from None
    except LookupError:
        raise ConfigError(f"data.encoding = {encoding!r} is not a known text encoding; use e.g. 'utf-8'") from None


def read_jsonl_column(path: Path, column: str) -> list[str]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({exc.msg}); fix that line") from None
            if not isinstance(obj, dict) or column not in obj:
                keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ConfigError(f"{path}:{lineno}: no text column {column!r} (found: {keys}); "
                                  "set data.text_column")
            value = obj[column]
            if value is None:
                continue
            if not isinstance(value, str):
                raise ConfigError(f"{path}:{lineno}: column {column!r} holds {type(value).__name__}, not text; "
                                  "set data.text_column to a text column")
            rows.append(value)
    return rows


def read_parquet_column(path: Path, column: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one user-facing line
        raise ConfigError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    if column not in names:
        raise ConfigError(f"{path}: no text column {column!r} (columns: {', '.join(names)}); set data.text_column")
    col = pq.read_table(path, columns=[column]).column(0)
    rows = col.to_pylist()
    bad = next((r for r in rows if r is not None and not isinstance(r, str)), None)
    if bad is not None:
        raise ConfigError(f"{path}: column {column!r} holds {type(bad).__name__}, not text; "
                          "set data.text_column to a text column")
    return [r for r in rows if r is not None]


# ---------------------------------------------------------------------------------------
# the train/eval split


def holdout(docs: list[str], fraction: float, mode: str, seed: int) -> tuple[list[str], list[str]]:
    """Split one source's documents into train and eval: ``tail`` holds out the last
    ``fraction`` of the documents (contiguous text); ``random`` a seeded random
    ``fraction`` of them. Both keep the documents' order and are deterministic."""
    n = len(docs)
    if n < 2:
        raise ConfigError(
            f"only {n} document(s): cannot hold out evaluation documents; give data.eval, or a "
            "data.documents rule that cuts the text into several documents (e.g. 'blank_lines')")
    k = min(n - 1, max(1, int(round(n * fraction))))
    if mode == "tail":
        return docs[:n - k], docs[n - k:]
    rng = np.random.default_rng([seed, 0x7e47])
    held = set(rng.permutation(n)[:k].tolist())
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def docs_digest(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()
