"""Engine configuration: one frozen dataclass, validated once at construction."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

LOAD_FORMATS = ("auto", "safetensors", "dummy")
"""How weights are read: from the folder (``auto``/``safetensors``) or made at random."""

KV_CACHE_DTYPES = ("auto", "int8", "fp8")
"""How KV is stored: at the model's dtype, or quantized (``kernels.kv_quant``)."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the engine needs to size and run itself (all defaults already resolved)."""

    model: str
    device: str
    dtype: str
    max_model_len: int
    block_size: int = 16
    chunk_size: int = 256
    kv_cache_tokens: int = 65536
    max_num_batched_tokens: int = 2048  # the hard cap on a step's tokens
    max_num_seqs: int = 128
    # Prefill per step sized so a step's predicted time stays within this many
    # milliseconds (engine.step_cost, fitted to the device's own steps); 0: a fixed
    # budget of max_num_batched_tokens, deterministic.
    step_time_target_ms: float = 0.0
    enable_prefix_caching: bool = True
    host_cache_tokens: int = 0
    disk_cache_dir: str | os.PathLike[str] | None = None
    disk_cache_bytes: int = 16 << 30
    kv_tiers: tuple[str, ...] = ()  # registered tiers behind host and disk, in order
    kv_store: str | None = None  # a shared Redis, "redis://host:port/db", matched last
    attention_backend: str = "auto"
    kv_cache_dtype: str = "auto"  # auto (the model's dtype), int8 or fp8: see kernels.kv_quant
    load_format: str = "auto"
    seed: int = 0
    max_pinned_tokens: int | None = None
    max_pinned_tokens_per_tenant: int | None = None  # None: the whole pinned-token cap
    # Sliding-window layers with a pool of their own that holds only their windows.
    # None: on for models with such layers unless tiers are on or it saves nothing.
    hybrid_kv_cache: bool | None = None
    window_kv_cache_tokens: int | None = None  # that pool's size; None: sized per window
    # Ranks the model is sharded over: rank 0 in this process, the others in worker
    # processes (``prefixcache.engine.tensor_parallel``).
    tensor_parallel_size: int = 1
    # Decode steps run eagerly even where CUDA graphs could replay them
    # (``engine.cuda_graphs``).
    enforce_eager: bool = False
    # Longest a tensor-parallel worker may take to start, or any collective to finish.
    tensor_parallel_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _positive("max_model_len", self.max_model_len)
        _positive("block_size", self.block_size)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_num_seqs", self.max_num_seqs)
        _check_step_time_target(self.step_time_target_ms)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.chunk_size <= 0 or self.chunk_size % self.block_size:
            raise ValueError(
                f"chunk_size must be a positive multiple of block_size ({self.block_size}), "
                f"got {self.chunk_size}"
            )
        if self.kv_cache_tokens < self.block_size:
            raise ValueError(
                f"kv_cache_tokens must hold at least one block of {self.block_size} tokens, "
                f"got {self.kv_cache_tokens}"
            )
        if self.max_pinned_tokens is not None and self.max_pinned_tokens < 0:
            raise ValueError(f"max_pinned_tokens must be >= 0, got {self.max_pinned_tokens}")
        per_tenant = self.max_pinned_tokens_per_tenant
        if per_tenant is not None and per_tenant < 0:
            raise ValueError(f"max_pinned_tokens_per_tenant must be >= 0, got {per_tenant}")
        _check_tiers(self)
        _check_tensor_parallel(self)
        _check_kv_store(self.kv_store)
        _check_hybrid(self)
        _check_backend(self.attention_backend)
        _check_kv_cache_dtype(self.kv_cache_dtype)
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(
                f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}"
            )

    @property
    def pinned_token_cap(self) -> int:
        """Most tokens pins may hold: ``max_pinned_tokens``, else half the KV pool."""
        if self.max_pinned_tokens is not None:
            return self.max_pinned_tokens
        return self.kv_cache_tokens // 2

    @property
    def has_kv_tiers(self) -> bool:
        """Whether any tier sits behind the device pool (host, disk, kv_store, named)."""
        host, disk = self.host_cache_tokens, self.disk_cache_dir
        return bool(host or disk is not None or self.kv_tiers or self.kv_store)

    @property
    def num_kv_blocks(self) -> int:
        """Blocks in the device KV pool."""
        return self.kv_cache_tokens // self.block_size

    @property
    def model_path(self) -> Path:
        """The model folder."""
        return Path(self.model)


def _check_tiers(config: EngineConfig) -> None:
    """The host tier holds whole hash chunks; the disk tier needs a positive bound; extra
    tiers are named (whether each name is registered is checked when tiers are built)."""
    host = config.host_cache_tokens
    if not isinstance(host, int) or host < 0:
        raise ValueError(f"host_cache_tokens must be >= 0, got {host!r}")
    if 0 < host < config.chunk_size:
        raise ValueError(
            f"host_cache_tokens must be 0 or at least one chunk ({config.chunk_size} tokens), "
            f"got {host}"
        )
    folder = config.disk_cache_dir
    if folder is not None and (not isinstance(folder, str | os.PathLike) or not str(folder)):
        raise ValueError(f"disk_cache_dir must be a folder path, got {folder!r}")
    _positive("disk_cache_bytes", config.disk_cache_bytes)
    names = config.kv_tiers
    if not isinstance(names, tuple | list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"kv_tiers must be a tuple of registered tier names, got {names!r}")


def _check_kv_store(url: str | None) -> None:
    """``kv_store`` is a Redis URL: ``redis://`` or ``rediss://`` with a host, or
    ``unix://`` with a socket path; a database, if given, is a number."""
    if url is None:
        return
    example = "e.g. 'redis://127.0.0.1:6379/0'"
    if not isinstance(url, str):
        raise ValueError(f"kv_store must be a Redis URL ({example}), got {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"kv_store {url!r} is not a valid URL: {exc}") from None
    if parts.scheme in ("redis", "rediss"):
        db = parts.path.strip("/")
        if not parts.hostname or (db and not db.isdigit()) or (port is not None and port <= 0):
            raise ValueError(f"kv_store must be redis://HOST[:PORT][/DB] ({example}), got {url!r}")
    elif parts.scheme != "unix" or not parts.path:
        raise ValueError(
            f"kv_store must be a redis://, rediss:// or unix:// URL ({example}), got {url!r}"
        )


def _check_hybrid(config: EngineConfig) -> None:
    """A hybrid KV cache keeps no tiers; its window pool holds at least one block."""
    hybrid, tokens = config.hybrid_kv_cache, config.window_kv_cache_tokens
    if hybrid not in (None, True, False):
        raise ValueError(f"hybrid_kv_cache must be true, false or None, got {hybrid!r}")
    if hybrid and config.has_kv_tiers:
        raise ValueError(
            "hybrid_kv_cache=True cannot be combined with host, disk, kv_store or extra KV tiers"
        )
    if tokens is not None and (not isinstance(tokens, int) or tokens < config.block_size):
        raise ValueError(
            f"window_kv_cache_tokens must hold at least one block of {config.block_size} "
            f"tokens, got {tokens!r}"
        )


def _check_tensor_parallel(config: EngineConfig) -> None:
    """A positive rank count; on CUDA the ranks take devices 0 .. size-1 (one each)."""
    size = config.tensor_parallel_size
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    timeout = config.tensor_parallel_timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"tensor_parallel_timeout_s must be > 0 seconds, got {timeout!r}")
    if size == 1:
        return
    device = config.device.split(":")
    if device[0] not in ("cpu", "cuda"):
        raise ValueError(
            f"tensor_parallel_size > 1 runs on cpu or cuda devices, got device {config.device!r}"
        )
    if device[0] == "cuda" and device[1:] not in ([], ["0"]):
        raise ValueError(
            f"with tensor_parallel_size {size} the ranks use cuda:0 .. cuda:{size - 1}; "
            f"got device {config.device!r}"
        )


def _check_backend(name: str) -> None:
    """The attention backend must be ``auto`` or one the kernel registry knows."""
    from kernels import available_backends  # the registry imports torch: only when checked

    known = ("auto", *available_backends())
    if name not in known:
        raise ValueError(f"attention_backend must be one of {', '.join(known)}, got {name!r}")


def _check_kv_cache_dtype(name: str) -> None:
    if name not in KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}"
        )


def _check_step_time_target(value: float) -> None:
    """A non-negative, finite number of milliseconds (0 turns the target off)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not 0 <= value < float("inf"):
        raise ValueError(
            f"step_time_target_ms must be a number of milliseconds >= 0 (0: off), got {value!r}"
        )


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
