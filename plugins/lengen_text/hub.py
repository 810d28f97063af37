"""The Hugging Face hub: a quick reachability probe, and loading from the local cache
when the hub cannot be reached.

``datasets.load_dataset`` retries an unreachable hub for about half a minute before it
gives up (23 s measured on a machine whose DNS fails at once). lengen asks first, with a
short timeout: when the hub does not answer, it loads in offline mode, which reads a
dataset already in the local Hugging Face cache and fails at once for one that is not.
``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) skips the probe.
"""

from __future__ import annotations

import contextlib
import os
import threading
import urllib.error
import urllib.request

from lengen.errors import ConfigError

LOCAL_ALTERNATIVES = ('use a local copy instead: dataset = "text", "parquet" or "jsonl" with '
                      "--data-dir DIR (see docs/data.md)")
_TRUE = {"1", "ON", "YES", "TRUE"}


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_by_env() -> str | None:
    """The environment variable that switches the hub off, if one does."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").upper() in _TRUE:
            return var
    return None


def probe(timeout: float = 3.0) -> str | None:
    """``None`` when the hub answers (any HTTP status) within ``timeout`` seconds, else why not.

    The request runs in a daemon thread joined with a deadline, so a resolver that hangs
    (which ``urlopen``'s timeout does not cover) cannot hold the caller.
    """
    url = endpoint() + "/api/datasets?limit=1"
    result: dict[str, str | None] = {}

    def ask():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result["why"] = None
        except urllib.error.HTTPError:
            result["why"] = None  # it answered
        except urllib.error.URLError as exc:
            result["why"] = f"{endpoint()}: {exc.reason}"
        except Exception as exc:  # noqa: BLE001 - any failure means unreachable
            result["why"] = f"{endpoint()}: {type(exc).__name__}: {exc}"

    thread = threading.Thread(target=ask, daemon=True, name="lengen-hub-probe")
    thread.start()
    thread.join(timeout + 0.5)
    if "why" not in result:
        return f"{endpoint()}: no answer within {timeout:g} s"
    return result["why"]


def hub_status(timeout: float) -> str | None:
    """``None`` if the hub may be used, else the reason it may not."""
    var = offline_by_env()
    if var:
        return f"offline mode is set ({var})"
    return probe(timeout)


@contextlib.contextmanager
def offline_mode():
    """Make ``datasets`` and ``huggingface_hub`` use only their local caches (both read
    their offline flag at import time, so the flags are switched here and restored)."""
    import datasets.config as dcfg
    import huggingface_hub.constants as hcfg

    saved = dcfg.HF_HUB_OFFLINE, hcfg.HF_HUB_OFFLINE
    dcfg.HF_HUB_OFFLINE = hcfg.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dcfg.HF_HUB_OFFLINE, hcfg.HF_HUB_OFFLINE = saved


def load_split(path: str, name: str | None, split: str, revision: str | None, *, unreachable: str | None):
    """One split of a hub dataset; from the local cache only when ``unreachable`` says why
    the hub cannot be used."""
    import datasets

    what = f"hf dataset {path!r}" + (f" ({name})" if name else "") + f" split {split!r}"
    mode = offline_mode() if unreachable else contextlib.nullcontext()
    try:
        with mode:
            return datasets.load_dataset(path, name, split=split, revision=revision)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        if unreachable:
            raise ConfigError(
                f"{what}: the Hugging Face hub is unreachable ({unreachable}) and the dataset is not in the "
                f"local cache ({datasets.config.HF_DATASETS_CACHE}); {LOCAL_ALTERNATIVES}") from None
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"{what}: {type(exc).__name__}: {first}; check data.path, data.name, "
                          "data.train_split and data.eval_split") from None


def pretrained_tokenizer_file(name: str, revision: str | None, timeout: float = 3.0) -> str:
    """The local path of a hub repository's ``tokenizer.json`` (downloaded once, then
    read from the Hugging Face cache, also offline)."""
    from huggingface_hub import hf_hub_download

    why = hub_status(timeout)
    try:
        mode = offline_mode() if why else contextlib.nullcontext()
        with mode:
            return hf_hub_download(name, "tokenizer.json", revision=revision, local_files_only=bool(why))
    except Exception as exc:  # noqa: BLE001
        if why:
            raise ConfigError(
                f"[tokenizer] pretrained {name!r}: the Hugging Face hub is unreachable ({why}) and its "
                "tokenizer.json is not in the local cache; use kind = 'file' with a local tokenizer.json, "
                "or kind = 'bpe'") from None
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"[tokenizer] pretrained {name!r}: {type(exc).__name__}: {first}; "
                          "check the repository name (it must hold a tokenizer.json)") from None
