"""Native CPU kernels: C sources in ``kernels/csrc``, built once per machine and loaded
with ctypes.

The build uses the system C compiler (``$CC``, else ``cc``) with ``-march=native``
and OpenMP, into a cache folder keyed by the source, the flags, the compiler and the
CPU, so it runs once (well under a second) and is reused by every later process.
Nothing here is required: without a compiler, on a failed build, or with
``PREFIXCACHE_NATIVE_KERNELS=0`` the loader returns None and callers use torch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "paged_decode.c"
# -ffast-math lets expf vectorize (glibc's libmvec); the link step leaves it out so the
# library does not switch the whole process to flush-denormals-to-zero.
_COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c")
_LINK_FLAGS = ("-shared", "-fopenmp")
_LIBS = ("-lmvec", "-lm")
_F32, _I32 = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int32)


def cache_dir() -> Path:
    """Where built kernels live (``PREFIXCACHE_KERNEL_CACHE``, else ~/.cache/prefixcache)."""
    configured = os.environ.get("PREFIXCACHE_KERNEL_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "prefixcache" / "kernels"


@functools.cache
def paged_decode_window():
    """The C ``paged_decode_window_f32`` function (sliding window, score cap), or None."""
    library = _library()
    if library is None:
        return None
    function = library.paged_decode_window_f32
    function.restype = ctypes.c_int
    function.argtypes = [_F32, _F32, _F32, _I32, _I32, _F32] + [ctypes.c_int] * 6
    function.argtypes += [ctypes.c_float, ctypes.c_int, ctypes.c_float, ctypes.c_int]
    return function


@functools.cache
def _library():
    """The float32 kernels' shared library, or None when native kernels are unavailable."""
    return load_library(_SOURCE)


def load_library(source_path: Path) -> ctypes.CDLL | None:
    """The built library of a source in ``csrc``, or None when native kernels are off,
    there is no compiler, or the build fails."""
    if os.environ.get("PREFIXCACHE_NATIVE_KERNELS", "1") == "0" or platform.system() != "Linux":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        logger.info("no C compiler found: decode attention stays on torch ops")
        return None
    try:
        return ctypes.CDLL(str(_built(compiler, source_path)))
    except (OSError, subprocess.SubprocessError) as exc:  # a failed or hung build
        logger.warning(
            "native decode kernel %s unavailable, using torch ops: %s", source_path.name, exc
        )
        return None


def _built(compiler: str, source_path: Path = _SOURCE) -> Path:
    """The shared library of ``source_path`` for this machine, compiled first if it is not
    cached yet. Its key covers every source in ``csrc`` (one may include another)."""
    key = hashlib.sha256(source_path.read_bytes())
    for other in sorted(_SOURCE.parent.glob("*.[ch]")):
        key.update(other.read_bytes())
    for part in (*_COMPILE_FLAGS, *_LINK_FLAGS, compiler, _compiler_version(compiler), _cpu()):
        key.update(part.encode())
    target = cache_dir() / f"{source_path.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        obj, lib = Path(work) / "kernel.o", Path(work) / "kernel.so"
        _run([compiler, *_COMPILE_FLAGS, str(source_path), "-o", str(obj)])
        _run([compiler, *_LINK_FLAGS, str(obj), "-o", str(lib), *_LIBS])
        os.replace(lib, target)  # atomic: a concurrent build ends with one of the two
    logger.info("built native decode kernel %s", target)
    return target


def _run(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu() -> str:
    """The CPU's model and feature flags (``-march=native`` code is only valid on them)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags")
    return "\n".join(sorted({ln for ln in lines if ln.startswith(wanted)}))


def decode_attention(
    query,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    scale: float,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
):
    """Attention of one new token per sequence over its paged context, in float32.

    ``query`` [seqs, heads, dim]; caches [blocks, block_size, kv_heads, dim];
    ``block_tables`` [seqs, max_blocks] and ``seq_lens`` [seqs] int32 (keys in each
    context, the query's own included). ``sliding_window`` keeps each query to its last
    that many keys; ``softcap`` caps scores to ``softcap * tanh(s / softcap)``. Returns
    None when the native kernel is unavailable or cannot take these shapes.
    """
    function = paged_decode_window()
    if function is None:
        return None
    query = query.contiguous()
    tables, lens = block_tables.contiguous(), seq_lens.contiguous()
    out = torch.empty_like(query)
    num_seqs, heads, dim = query.shape
    _, block_size, kv_heads, _ = k_cache.shape
    status = function(
        data_pointer(query, _F32),
        data_pointer(k_cache, _F32),
        data_pointer(v_cache, _F32),
        data_pointer(tables, _I32),
        data_pointer(lens, _I32),
        data_pointer(out, _F32),
        num_seqs,
        heads,
        kv_heads,
        dim,
        block_size,
        tables.shape[1],
        scale,
        sliding_window or 0,
        softcap or 0.0,
        torch.get_num_threads(),
    )
    return out if status == 0 else None


def data_pointer(tensor: torch.Tensor, kind):
    """A ctypes pointer of type ``kind`` to ``tensor``'s data, for the C kernels."""
    return ctypes.cast(tensor.data_ptr(), kind)
