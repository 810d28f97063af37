"""Real text: documents, tokenizers, the cache, hygiene, the hub's offline path, and a
`lengen run` on a text dataset. CPU only, no network; the corpora are written here (the
WikiText-2 / Tiny Shakespeare checks skip when ../shared/data is absent)."""

import json
import random
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lengen.api import DataContext
from lengen.errors import ConfigError
from lengen_text import datasets as DS
from lengen_text import hub, tokenize
from lengen_text.documents import split_documents

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]

WORDS = ("the of and to in a is was for on as with by he at from his an were are which this be it had not or "
         "harbour castle river north army king song album film season storm road station village church").split()


def prose(seed: int, words: int) -> str:
    """Deterministic pseudo-English: sentences of random words, one paragraph per line."""
    rng = random.Random(seed)
    lines, line = [], []
    for i in range(words):
        line.append(rng.choice(WORDS))
        if rng.random() < 0.08:
            line[-1] += " ."
            if rng.random() < 0.3:
                lines.append(" " + " ".join(line))
                line = []
    lines.append(" " + " ".join(line) + " .")
    return "\n".join(lines) + "\n"


def ctx(tmp_path, tokenizer=None, **kw):
    base = dict(seed=0, window=16, eval_length=64, eval_sequences=4, train_tokens=1000,
                cache_dir=tmp_path / "cache", data_dir=tmp_path / "data", tokenizer=tokenizer)
    base.update(kw)
    return DataContext(**base)


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "data"
    (d / "train").mkdir(parents=True)
    (d / "eval").mkdir()
    for i in range(3):
        (d / "train" / f"doc{i}.txt").write_text(prose(i, 400))
    for i in range(2):
        (d / "eval" / f"doc{i}.txt").write_text(prose(100 + i, 300))
    return d


def load_text(tmp_path, tokenizer=None, c=None, **cfg):
    ds = DS.TextFiles()
    return ds.load(ds.Config(**cfg), c or ctx(tmp_path, tokenizer))


# ---------------------------------------------------------------------------------------
# the local pipeline


def test_local_pipeline_end_to_end(tmp_path, corpus_dir):
    tok = {"kind": "bpe", "vocab_size": 300}
    a = load_text(tmp_path, tok, train="train/*.txt", eval="eval/*.txt")
    # one document per file, boundaries kept, the streams decode back to the files
    assert list(a.train.doc_starts[:1]) == [0] and len(a.train.doc_starts) == 3
    assert len(a.eval.doc_starts) == 2
    assert a.train.tokens.dtype == np.int64 and a.eval.doc_starts.dtype == np.int64
    docs = list(a.eval.documents())
    assert a.decode(a.eval.tokens[docs[1][0]:docs[1][1]]) == (corpus_dir / "eval" / "doc1.txt").read_text()
    assert a.vocab_size <= 300 and int(a.train.tokens.max()) < a.vocab_size
    # the tokenizer is recorded: name, settings, vocabulary hash
    t = a.tokenizer
    assert t["name"] == "byte-level BPE 300" and t["settings"]["vocab_size"] == 300
    assert len(t["vocab_hash"]) == 16 and t["hash"] and t["vocab_size"] == a.vocab_size
    assert a.info["cache"] == "miss" and a.info["documents"] == {"rule": "file", "train": 3, "eval": 2}
    assert set(a.info["overlap"]) >= {"ngram", "ngram_shared", "lines_shared"}
    assert a.info["source"]["train"][0]["file"] == "train/doc0.txt"

    # deterministic: a fresh cache gives the same tokens, tokenizer and fingerprint
    b = load_text(tmp_path, tok, c=ctx(tmp_path, tok, cache_dir=tmp_path / "other"), train="train/*.txt",
                  eval="eval/*.txt")
    assert b.info["cache"] == "miss"
    assert np.array_equal(a.train.tokens, b.train.tokens) and np.array_equal(a.eval.tokens, b.eval.tokens)
    assert a.fingerprint == b.fingerprint and a.tokenizer == b.tokenizer

    # the second load is a cache hit with the same corpus
    c = load_text(tmp_path, tok, train="train/*.txt", eval="eval/*.txt")
    assert c.info["cache"] == "hit" and c.fingerprint == a.fingerprint
    assert np.array_equal(c.eval.tokens, a.eval.tokens) and np.array_equal(c.train.doc_starts, a.train.doc_starts)
    assert c.decode(c.eval.tokens[:20]) == a.decode(a.eval.tokens[:20])

    # changing a file (even an eval file) changes the fingerprint and misses the cache
    (corpus_dir / "eval" / "doc1.txt").write_text(prose(7, 300))
    d = load_text(tmp_path, tok, train="train/*.txt", eval="eval/*.txt")
    assert d.info["cache"] == "miss" and d.fingerprint != a.fingerprint
    # so do tokenizer settings; a warning threshold does not
    e = load_text(tmp_path, {"kind": "bpe", "vocab_size": 280}, train="train/*.txt", eval="eval/*.txt")
    assert e.fingerprint not in (a.fingerprint, d.fingerprint)
    f = load_text(tmp_path, tok, train="train/*.txt", eval="eval/*.txt", overlap_warn=0.5)
    assert f.info["cache"] == "hit" and f.fingerprint == d.fingerprint


def test_cached_load_does_no_tokenization(tmp_path, corpus_dir, monkeypatch):
    tok = {"kind": "bpe", "vocab_size": 300}
    first = load_text(tmp_path, tok, train="train/*.txt", eval="eval/*.txt", separator="<|sep|>")

    def boom(*a, **k):
        raise AssertionError("tokenized on a cached load")

    monkeypatch.setattr(tokenize, "encode_documents", boom)
    monkeypatch.setattr(tokenize, "train_bpe", boom)
    monkeypatch.setattr(tokenize, "build", boom)
    t0 = time.perf_counter()
    again = load_text(tmp_path, tok, train="train/*.txt", eval="eval/*.txt", separator="<|sep|>")
    assert time.perf_counter() - t0 < 1.0
    assert again.info["cache"] == "hit"
    assert np.array_equal(again.train.tokens, first.train.tokens)
    assert again.tokenizer == first.tokenizer and again.info["overlap"] == first.info["overlap"]


def test_holdout_split_is_deterministic_document_level(tmp_path, corpus_dir):
    text = "".join(f" = Article {i} = \n \n" + prose(i, 120) + " \n" for i in range(20))
    (corpus_dir / "all.txt").write_text(text)
    byte = {"kind": "byte"}
    a = load_text(tmp_path, byte, train="all.txt", documents="wikitext", holdout_fraction=0.2)
    assert a.info["documents"]["train"] == 16 and a.info["documents"]["eval"] == 4
    assert "random" in a.info["split"] and "data_seed 0" in a.info["split"]
    b = load_text(tmp_path, byte, c=ctx(tmp_path, byte, cache_dir=tmp_path / "c2"), train="all.txt",
                  documents="wikitext", holdout_fraction=0.2)
    assert np.array_equal(a.eval.tokens, b.eval.tokens) and a.fingerprint == b.fingerprint
    c = load_text(tmp_path, byte, c=ctx(tmp_path, byte, seed=1), train="all.txt", documents="wikitext",
                  holdout_fraction=0.2)
    assert c.fingerprint != a.fingerprint
    # every document lands on exactly one side; tail keeps the last ones
    eval_titles = {a.decode(a.eval.tokens[s:e]).split("\n")[0] for s, e in a.eval.documents()}
    train_titles = {a.decode(a.train.tokens[s:e]).split("\n")[0] for s, e in a.train.documents()}
    assert not eval_titles & train_titles and len(eval_titles | train_titles) == 20
    t = load_text(tmp_path, byte, train="all.txt", documents="wikitext", holdout="tail", holdout_fraction=0.2)
    assert [t.decode(t.eval.tokens[s:e]).split("\n")[0] for s, e in t.eval.documents()] == [
        f" = Article {i} = " for i in range(16, 20)]


# ---------------------------------------------------------------------------------------
# documents


def test_wikitext_heading_split():
    text = (" \n = Alpha = \n \n Alpha text .\n \n = = Section = = \n \n More alpha .\n"
            " = not a heading = \n \n = Beta = \n \n Beta text .\n")
    docs = split_documents(text, "wikitext")
    assert len(docs) == 2
    assert docs[0].startswith(" = Alpha = ") and "= = Section = =" in docs[0] and "not a heading" in docs[0]
    assert docs[1].startswith(" = Beta = ")
    assert "".join(docs) == text[2:]  # nothing lost but the blank line before the first heading
    # the hub's rows (one line each, blank rows empty) give the same documents
    rows = [ln + "\n" if ln.strip() else "" for ln in text.split("\n")[:-1]]
    ds = DS.HubConfig(path="x", documents="wikitext")
    from lengen_text.documents import rows_to_documents

    hub_docs = rows_to_documents(rows, ds.documents, None)
    assert [d.split("\n")[0] for d in hub_docs] == [" = Alpha = ", " = Beta = "]


def test_blank_lines_and_regex_rules():
    text = "A:\nhello\n\n\nB:\nworld\n \nC:\nagain\n"
    docs = split_documents(text, "blank_lines")
    assert docs == ["A:\nhello\n\n\n", "B:\nworld\n \n", "C:\nagain\n"] and "".join(docs) == text
    chapters = "preface\nCHAPTER 1\none\nCHAPTER 2\ntwo\n"
    assert split_documents(chapters, "regex", r"^CHAPTER ") == ["preface\n", "CHAPTER 1\none\n", "CHAPTER 2\ntwo\n"]
    assert split_documents("one file\n", "file") == ["one file\n"] and split_documents(" \n", "file") == []
    with pytest.raises(ValueError, match="needs doc_regex"):
        DS.TextFilesConfig(train="x", documents="regex")


# ---------------------------------------------------------------------------------------
# tokenizers


def test_char_tokenizer(tmp_path, corpus_dir):
    (corpus_dir / "e.txt").write_text("the ∑ end\n")
    c = load_text(tmp_path, {"kind": "char"}, train="train/*.txt", eval="e.txt")
    train_chars = set("".join((corpus_dir / "train" / f"doc{i}.txt").read_text() for i in range(3)))
    assert c.vocab_size == len(train_chars) + 1  # + <unk>
    assert len(c.eval) == len("the ∑ end\n")  # one token per character
    assert c.decode(c.eval.tokens) == "the <unk> end\n"  # unseen in training
    assert c.tokenizer["name"] == "char"


def test_byte_tokenizer(tmp_path, corpus_dir):
    text = "héllo wörld ∑\n"
    (corpus_dir / "e.txt").write_text(text)
    c = load_text(tmp_path, {"kind": "byte"}, train="train/*.txt", eval="e.txt", separator="<|doc|>")
    assert c.vocab_size == 257 and c.tokenizer["separator_id"] == 256
    assert list(c.eval.tokens) == [256] + list(text.encode())  # id == byte value, separator first
    assert c.decode(c.eval.tokens[1:]) == text


def test_bpe_trained_on_training_split_only(tmp_path, corpus_dir):
    (corpus_dir / "e.txt").write_text(" zyzzyvaquux" * 500 + "\n")
    c = load_text(tmp_path, {"kind": "bpe", "vocab_size": 400}, train="train/*.txt", eval="e.txt")
    tokenizer_json = tmp_path / "cache" / "text" / c.info["cache_key"] / "tokenizer.json"
    vocab = set(json.loads(tokenizer_json.read_text())["model"]["vocab"])
    assert "Ġzyzzyvaquux" not in vocab and "Ġharbour" in vocab  # eval-only words are not merged
    assert len(c.eval) > 2 * 500


def test_tokenizer_json_file(tmp_path, corpus_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([prose(5, 2000)], trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"],
                                                                  show_progress=False))
    tok.save(str(corpus_dir / "my-tokenizer.json"))
    c = load_text(tmp_path, {"kind": "file", "path": "my-tokenizer.json"}, train="train/*.txt", eval="eval/*.txt")
    expected = tok.encode((corpus_dir / "eval" / "doc0.txt").read_text()).ids
    s, e = next(c.eval.documents())
    assert list(c.eval.tokens[s:e]) == expected
    assert c.tokenizer["kind"] == "file" and c.vocab_size == tok.get_vocab_size()
    # a different tokenizer.json at the same path is a different corpus
    tok.add_tokens(["harbour castle"])
    tok.save(str(corpus_dir / "my-tokenizer.json"))
    d = load_text(tmp_path, {"kind": "file", "path": "my-tokenizer.json"}, train="train/*.txt", eval="eval/*.txt")
    assert d.info["cache"] == "miss" and d.fingerprint != c.fingerprint


@pytest.mark.parametrize("table, match", [
    ({"kind": "bpe", "vocab": 100}, "unknown key 'vocab'; did you mean 'vocab_size'"),
    ({"kind": "char", "vocab_size": 300}, "vocab_size applies to kind = 'bpe' only"),
    ({"kind": "file"}, "needs path"),
    ({"kind": "sentencepiece"}, "kind"),
])
def test_tokenizer_table_errors(tmp_path, corpus_dir, table, match):
    with pytest.raises(ConfigError, match=match) as exc:
        load_text(tmp_path, table, train="train/*.txt", eval="eval/*.txt")
    assert "\n" not in str(exc.value)


def test_file_errors_are_one_line(tmp_path, corpus_dir):
    with pytest.raises(ConfigError, match=r"no file matches 'nope/\*.txt'.*--data-dir") as exc:
        load_text(tmp_path, None, train="nope/*.txt")
    assert "\n" not in str(exc.value)
    (corpus_dir / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ConfigError, match="not valid utf-8.*data.encoding"):
        load_text(tmp_path, {"kind": "byte"}, train="bad.txt", eval="eval/*.txt")
    (corpus_dir / "binary.txt").write_bytes(b"PK\x03\x04\x00\x00\xff\xfe binary")  # e.g. a zip renamed .txt
    with pytest.raises(ConfigError, match=r"binary.txt: binary data \(a NUL byte at offset 4\), not text") as exc:
        load_text(tmp_path, {"kind": "byte"}, train="binary.txt", eval="eval/*.txt")
    assert "latin" not in str(exc.value)
    with pytest.raises(ConfigError, match="only 1 document"):
        load_text(tmp_path, {"kind": "byte"}, train="train/doc0.txt")


# ---------------------------------------------------------------------------------------
# jsonl and parquet


def test_jsonl_and_parquet_give_the_same_corpus(tmp_path, corpus_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [prose(i, 150) for i in range(12)]
    with open(corpus_dir / "rows.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"id": i, "body": r}) + "\n")
    pq.write_table(pa.table({"id": list(range(12)), "body": rows}), corpus_dir / "rows.parquet")
    byte = {"kind": "byte"}
    j = DS.JsonlFiles().load(DS.TableFilesConfig(train="rows.jsonl", text_column="body"), ctx(tmp_path, byte))
    p = DS.ParquetFiles().load(DS.TableFilesConfig(train="rows.parquet", text_column="body"), ctx(tmp_path, byte))
    assert j.info["documents"]["train"] + j.info["documents"]["eval"] == 12
    assert np.array_equal(j.train.tokens, p.train.tokens) and np.array_equal(j.eval.doc_starts, p.eval.doc_starts)
    with pytest.raises(ConfigError, match="no text column 'text'.*body.*data.text_column"):
        DS.ParquetFiles().load(DS.TableFilesConfig(train="rows.parquet"), ctx(tmp_path, byte))
    with pytest.raises(ConfigError, match="rows.jsonl:1: no text column 'text'"):
        DS.JsonlFiles().load(DS.TableFilesConfig(train="rows.jsonl"), ctx(tmp_path, byte))


# ---------------------------------------------------------------------------------------
# the hub


@pytest.fixture
def no_offline_env(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def test_offline_hub_fails_fast_with_one_clear_line(tmp_path, monkeypatch, no_offline_env):
    import datasets.config
    import huggingface_hub.constants

    flags = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    monkeypatch.setattr(hub, "probe", lambda timeout=3.0: "simulated: no route to huggingface.co")
    cfg = DS.HubConfig(path="lengen-tests/not-a-cached-dataset", name="raw")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as exc:
        DS.HubDataset().load(cfg, ctx(tmp_path))
    assert time.perf_counter() - t0 < 5
    msg = str(exc.value)
    assert "\n" not in msg and "unreachable" in msg and "simulated" in msg
    for alternative in ('"text"', '"parquet"', '"jsonl"', "--data-dir"):
        assert alternative in msg
    # the offline flags are restored afterwards
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == flags


def test_offline_env_skips_the_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "probe", lambda timeout=3.0: pytest.fail("probed although offline"))
    with pytest.raises(ConfigError, match=r"unreachable \(offline mode is set \(HF_HUB_OFFLINE\)\)"):
        DS.HubDataset().load(DS.HubConfig(path="lengen-tests/nothing"), ctx(tmp_path))


def test_probe_gives_up_quickly(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://192.0.2.1:9")  # TEST-NET-1: never answers
    t0 = time.perf_counter()
    why = hub.probe(timeout=0.5)
    assert why and "192.0.2.1" in why and time.perf_counter() - t0 < 2


def test_offline_hub_loads_a_cached_dataset(tmp_path, monkeypatch, no_offline_env):
    import datasets

    monkeypatch.setattr(hub, "probe", lambda timeout=3.0: "simulated: unreachable")
    def rows(topics):  # the hub's wikitext form: one row per line, blank rows empty
        text = "".join(f" \n = Topic {i} = \n \n" + prose(i, 200) for i in topics)
        return [ln + "\n" if ln.strip() else "" for ln in text.split("\n")[:-1]]

    splits = {"train": rows(range(4)), "test": rows(range(4, 6))}
    calls = []

    def cached_load_dataset(path, name=None, split=None, revision=None, **kw):
        calls.append((path, name, split, datasets.config.HF_HUB_OFFLINE))
        return datasets.Dataset.from_dict({"text": splits[split]})

    monkeypatch.setattr(datasets, "load_dataset", cached_load_dataset)
    cfg = DS.HubConfig(path="wikitext", name="wikitext-103-raw-v1", documents="wikitext", separator="<|endoftext|>")
    c = DS.HubDataset().load(cfg, ctx(tmp_path, {"kind": "bpe", "vocab_size": 300}))
    assert calls == [("wikitext", "wikitext-103-raw-v1", "train", True), ("wikitext", "wikitext-103-raw-v1", "test", True)]
    assert c.info["documents"] == {"rule": "wikitext", "train": 4, "eval": 2}
    sep = c.tokenizer["separator_id"]
    assert (c.eval.tokens[c.eval.doc_starts] == sep).all() and (c.train.tokens == sep).sum() == len(c.train.doc_starts)
    assert c.info["source"]["train_fingerprint"]


def test_pretrained_tokenizer_offline(tmp_path, corpus_dir, monkeypatch, no_offline_env):
    import huggingface_hub
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    monkeypatch.setattr(hub, "probe", lambda timeout=3.0: "simulated: unreachable")
    table = {"kind": "pretrained", "name": "lengen-tests/not-cached"}
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="hub is unreachable .* not in the local cache; use kind = 'file'"):
        load_text(tmp_path, table, train="train/*.txt", eval="eval/*.txt")
    assert time.perf_counter() - t0 < 5
    # a tokenizer.json already in the HF cache is used offline
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([prose(9, 3000)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(tmp_path / "cached-tokenizer.json"))
    seen = []

    def from_cache(repo, filename, revision=None, local_files_only=False, **kw):
        seen.append((repo, filename, local_files_only))
        return str(tmp_path / "cached-tokenizer.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", from_cache)
    c = load_text(tmp_path, {"kind": "pretrained", "name": "gpt2"}, train="train/*.txt", eval="eval/*.txt",
                  separator="<|endoftext|>")
    assert seen == [("gpt2", "tokenizer.json", True)]
    assert c.tokenizer["name"] == "pretrained gpt2" and c.tokenizer["separator_id"] == tok.token_to_id("<|endoftext|>")
    assert c.vocab_size == tok.get_vocab_size()


# ---------------------------------------------------------------------------------------
# hygiene


def test_overlap_flags_a_planted_duplicate(tmp_path, corpus_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # disjoint text: no warning
        clean = load_text(tmp_path, {"kind": "byte"}, train="train/*.txt", eval="eval/*.txt")
    assert clean.info["overlap"]["ngram_shared"] < 0.01 and clean.info["overlap"]["lines_shared"] == 0
    # plant an evaluation document in the training split
    (corpus_dir / "train" / "leak.txt").write_text((corpus_dir / "eval" / "doc0.txt").read_text())
    with pytest.warns(UserWarning, match=r"data hygiene: .*of evaluation 13-grams .*also occur in the training split"):
        leaky = load_text(tmp_path, {"kind": "byte"}, train="train/*.txt", eval="eval/*.txt")
    ov = leaky.info["overlap"]
    assert 0.3 < ov["ngram_shared"] < 0.7 and 0.3 < ov["lines_shared"] < 0.7 and ov["example"]
    # the figure is recorded (and warned about again) on a cached load too
    with pytest.warns(UserWarning, match="data hygiene"):
        again = load_text(tmp_path, {"kind": "byte"}, train="train/*.txt", eval="eval/*.txt")
    assert again.info["cache"] == "hit" and again.info["overlap"] == ov


def test_importing_the_plugin_is_light():
    code = ("import sys, lengen_text, lengen_text.datasets; "
            "heavy = [m for m in ('torch', 'datasets', 'tokenizers', 'pyarrow') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------
# real corpora (../shared/data)

needs_shared = pytest.mark.skipif(not (SHARED / "wikitext-2" / "test.txt").is_file(),
                                  reason=f"real corpora not found at {SHARED} (../shared/data from the repo root)")


@needs_shared
def test_wikitext2_real(tmp_path):
    tok = {"kind": "bpe", "vocab_size": 4096}
    c = ctx(tmp_path, tok, data_dir=SHARED / "wikitext-2", eval_length=1280)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        corpus = load_text(tmp_path, c=c, train="valid.txt", eval="test.txt", documents="wikitext")
    info = corpus.info
    assert info["documents"] == {"rule": "wikitext", "train": 60, "eval": 60}
    assert 250_000 < info["tokens"]["train"] < 350_000 and info["overlap"]["ngram_shared"] < 0.01
    assert info["eval_documents"]["packed_sequences"] > 200 and info["eval_documents"]["long_enough"] > 50
    assert corpus.decode(corpus.eval.tokens[:8]).startswith(" = Robert <unk> = ")


@needs_shared
def test_shakespeare_char_real(tmp_path):
    c = ctx(tmp_path, {"kind": "char"}, data_dir=SHARED / "tinyshakespeare", eval_length=1280)
    corpus = load_text(tmp_path, c=c, train="input.txt", documents="blank_lines", holdout="tail")
    assert corpus.vocab_size == 66 and len(corpus.train) + len(corpus.eval) == (SHARED / "tinyshakespeare" / "input.txt").stat().st_size
    assert corpus.info["eval_documents"]["packed_sequences"] >= 64


def test_real_text_suites_validate():
    from lengen.suites import load_suites_file

    suites = load_suites_file(REPO / "benchmarks.toml")
    assert {"wikitext2-small", "shakespeare-char", "wikitext103-w64", "wikitext103-w128"} <= set(suites)
    for s in suites.values():
        if s.dataset == "synthetic":
            continue
        assert s.dataset in ("text", "hf") and s.tokenizer and s.eval.doc_policy == "packed"
        tokenize.parse_tokenizer(s.tokenizer)
        cfg = (DS.HubConfig if s.dataset == "hf" else DS.TextFilesConfig)(**s.data)
        assert cfg


# ---------------------------------------------------------------------------------------
# `lengen run` end to end


def test_cli_run_on_a_text_dataset(tmp_path, corpus_dir):
    from lengen.cli import make_cli

    (corpus_dir / "book.txt").write_text("".join(f"CHAPTER {i}\n" + prose(200 + i, 250) for i in range(8)))
    bench = tmp_path / "bench.toml"
    bench.write_text(textwrap.dedent("""
        [text-tiny]
        description = "a tiny text suite for the tests"
        dataset = "text"
        window = 16
        archs = ["sw"]

        [text-tiny.data]
        train = "book.txt"
        documents = "regex"
        doc_regex = "^CHAPTER "
        holdout = "tail"
        holdout_fraction = 0.25

        [text-tiny.tokenizer]
        kind = "bpe"
        vocab_size = 300

        [text-tiny.train]
        steps = 50
        batch_size = 4

        [text-tiny.eval]
        length = 4
        positions = [1, 2, 4]
        lengths = [1, 2, 4]
        sequences = 4
        batch_size = 4
        bootstrap = 20
        doc_policy = "packed"

        [text-tiny.arch.sw]
        d_model = 32
        n_layers = 1
        n_heads = 2
    """))
    results = tmp_path / "results"
    args = ["run", "--benchmark", "text-tiny", "--benchmarks-file", str(bench), "--data-dir", str(corpus_dir),
            "--cache-dir", str(tmp_path / "cache"), "--results", str(results), "--steps", "3", "--no-plot"]
    res = CliRunner().invoke(make_cli(), args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (record_path,) = results.rglob("record.json")
    rec = json.loads(record_path.read_text())
    ds = rec["dataset"]
    assert ds["name"] == "text" and ds["plugin"] == "text" and ds["fingerprint"]
    assert ds["tokenizer"]["name"] == "byte-level BPE 300" and ds["tokenizer"]["vocab_hash"]
    assert ds["info"]["overlap"]["ngram"] == 13 and "ngram_shared" in ds["info"]["overlap"]
    assert ds["info"]["documents"]["eval"] == 2 and ds["info"]["cache"] == "miss"
    assert rec["protocol"]["doc_policy"] == "packed" and rec["train"]["steps"] == 3
    # the same run again reads the cache
    res = CliRunner().invoke(make_cli(), args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    recs = [json.loads(p.read_text()) for p in results.rglob("record.json")]
    assert sorted(r["dataset"]["info"]["cache"] for r in recs) == ["hit", "miss"]
    assert len({r["dataset"]["fingerprint"] for r in recs}) == 1


def test_cli_reports_a_bad_data_key_in_one_line(tmp_path, corpus_dir):
    from lengen.cli import make_cli

    bench = tmp_path / "bench.toml"
    bench.write_text('[t]\ndataset = "text"\nwindow = 16\n[t.data]\ntrain = "book.txt"\ndocument = "file"\n'
                     '[t.train]\nsteps = 1\n[t.eval]\nlength = 4\npositions = [1]\n')
    res = CliRunner().invoke(make_cli(), ["run", "--arch", "sw", "--benchmark", "t", "--benchmarks-file", str(bench),
                                          "--results", str(tmp_path / "r")])
    assert res.exit_code != 0
    assert f"Error: {bench}:6: suite 't': unknown key 'document' in [t.data]; did you mean 'documents'?" in res.output
    assert "Traceback" not in res.output
