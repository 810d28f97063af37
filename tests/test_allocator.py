"""lengen.allocator: glibc mallopt settings applied once, and only when wanted."""

import sys

import pytest

from lengen import allocator


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(allocator, "_done", None)


def test_opt_out(monkeypatch):
    monkeypatch.setenv("LENGEN_MALLOC_TUNING", "0")
    assert allocator.tune() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_applied_once_on_glibc(monkeypatch):
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    monkeypatch.delenv("LENGEN_MALLOC_TUNING", raising=False)
    calls = []
    real = ctypes.CDLL

    class Spy:
        def __init__(self, name):
            self.lib = real(name)

        @property
        def mallopt(self):
            fn = self.lib.mallopt

            def wrapped(opt, value):
                calls.append((opt, value))
                return fn(opt, value)
            wrapped.argtypes = wrapped.restype = None
            return wrapped

    monkeypatch.setattr(ctypes, "CDLL", Spy)
    assert allocator.tune() is True
    assert allocator.tune() is True  # the second call does nothing
    assert calls == [(allocator.M_MMAP_THRESHOLD, allocator.MMAP), (allocator.M_TRIM_THRESHOLD, allocator.TRIM),
                     (allocator.M_TOP_PAD, allocator.TOP_PAD)]
