"""Choosing an attention backend by name: registry, availability, ``auto``, fallbacks."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from kernels import AttentionMetadata, available_backends, get_backend
from kernels.flash_attn_backend import FlashAttnBackend
from kernels.torch_ref import TorchReferenceBackend
from kernels.triton_backend import TritonBackend, triton_importable
from prefixcache import Engine
from prefixcache.config import EngineConfig

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def no_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _hide_package(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make ``importlib.util.find_spec(name)`` say the package is not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a)
    )


def test_the_config_accepts_exactly_auto_and_the_registered_backends():
    assert set(available_backends()) == {"torch", "triton", "flash-attn"}
    for name in ("auto", *available_backends()):
        EngineConfig(model="m", device="cpu", dtype="float32", max_model_len=64,
                     attention_backend=name)  # fmt: skip
    with pytest.raises(ValueError, match="attention_backend must be one of auto, "):
        EngineConfig(model="m", device="cpu", dtype="float32", max_model_len=64,
                     attention_backend="xformers")  # fmt: skip


def test_importing_kernels_imports_neither_triton_nor_flash_attn():
    code = "import sys, kernels; print('triton' in sys.modules, 'flash_attn' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_auto_is_the_torch_reference_on_cpu(no_interpreter):
    assert isinstance(get_backend("auto", "cpu"), TorchReferenceBackend)


def test_triton_on_cpu_needs_the_interpreter(no_interpreter, monkeypatch):
    with pytest.raises(ValueError, match="'triton' is not available on device cpu"):
        get_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert TritonBackend.is_available(CPU) == triton_importable()


def test_triton_is_unavailable_without_the_package(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _hide_package(monkeypatch, "triton")
    assert not TritonBackend.is_available(CPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not TritonBackend.is_available(CUDA)


def test_flash_attn_is_never_available_on_cpu():
    with pytest.raises(ValueError, match="'flash-attn' is not available on device cpu"):
        get_backend("flash-attn", "cpu")


def test_flash_attn_on_cuda_needs_the_package(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _hide_package(monkeypatch, "flash_attn")
    assert not FlashAttnBackend.is_available(CUDA)


def test_flash_attn_is_available_on_cuda_with_the_package_without_importing_it(monkeypatch):
    # find_spec finds a (fake) package that importing would fail on: only the spec counts.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert FlashAttnBackend.is_available(CUDA)


@pytest.mark.parametrize(
    ("flash", "triton", "expected"),
    [
        (True, True, FlashAttnBackend),
        (False, True, TritonBackend),
        (False, False, TorchReferenceBackend),
    ],
)
def test_auto_prefers_flash_attn_then_triton_then_torch(monkeypatch, flash, triton, expected):
    monkeypatch.setattr(FlashAttnBackend, "is_available", classmethod(lambda cls, d: flash))
    monkeypatch.setattr(TritonBackend, "is_available", classmethod(lambda cls, d: triton))
    assert type(get_backend("auto", CUDA)) is expected


def test_flash_attn_backend_falls_back_where_flash_cannot_read_the_pools(no_interpreter):
    # float32 pools with 16-token blocks: flash-attn 2 cannot read them, so the step
    # runs on the fallback (the torch reference on a CPU without the interpreter).
    gen = torch.Generator().manual_seed(0)
    meta = AttentionMetadata.build([3, 1], [19, 9], [[2, 0], [1]], block_size=16)
    k_cache, v_cache = torch.randn(2, 3, 16, 2, 16, generator=gen)
    q, k, v = torch.randn(4, 8, 16, generator=gen).split([4, 2, 2], dim=1)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    out = FlashAttnBackend().forward(q, k, v, k_cache, v_cache, meta, 0.25)
    expected = TorchReferenceBackend().forward(q, k, v, ref_k, ref_v, meta, 0.25)
    assert torch.equal(out, expected) and torch.equal(k_cache, ref_k)


def test_engine_refuses_a_backend_this_device_cannot_run(tiny_llama, no_interpreter):
    with pytest.raises(ValueError, match="not available on device cpu"):
        Engine.from_pretrained(str(tiny_llama), device="cpu", attention_backend="flash-attn")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_cuda_picks_a_gpu_backend():
    backend = get_backend("auto", "cuda")
    expected = FlashAttnBackend if importlib.util.find_spec("flash_attn") else TritonBackend
    assert type(backend) is expected
