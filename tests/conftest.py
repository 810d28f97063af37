import os
import sys
import textwrap
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep the test session's caches (passed checks, tokenized data) out of ~/.cache."""
    old = os.environ.get("LENGEN_CACHE")
    os.environ["LENGEN_CACHE"] = str(tmp_path_factory.mktemp("lengen-cache"))
    yield
    if old is None:
        os.environ.pop("LENGEN_CACHE", None)
    else:
        os.environ["LENGEN_CACHE"] = old


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Install a throwaway distribution on sys.path: ``fake_dist("name", {"ep": "module"},
    {"module.py": source})``. Its entry points are seen by importlib.metadata."""

    def make(name: str, entry_points: dict[str, str], modules: dict[str, str] | None = None,
             version: str = "0.1"):
        root = tmp_path / f"site-{name}"
        root.mkdir()
        info = root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        eps = "[lengen]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(eps)
        for fname, src in (modules or {}).items():
            (root / fname).write_text(textwrap.dedent(src))
        monkeypatch.syspath_prepend(str(root))
        return root

    yield make
    for mod in [m for m in sys.modules if m.startswith("fakeplug")]:
        del sys.modules[mod]


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
