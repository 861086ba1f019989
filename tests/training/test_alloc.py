"""The glibc allocator settings: applied once, harmless to repeat, a no-op elsewhere."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from training import alloc


@pytest.mark.skipif(platform.system() != "Linux" or "musl" in (ctypes.util.find_library("c") or ""), reason="glibc only")
def test_tune_allocator_applies_on_glibc_and_is_idempotent() -> None:
    assert alloc.tune_allocator() is True
    assert alloc.tune_allocator() is True  # the second call does not call mallopt again
    assert alloc._done


def test_tune_allocator_without_mallopt_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alloc, "_done", False)

    def no_libc(*a, **k):
        raise OSError("no libc here")

    monkeypatch.setattr(alloc.ctypes, "CDLL", no_libc)
    assert alloc.tune_allocator() is False
