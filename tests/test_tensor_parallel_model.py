"""The sharded model at TP=2 (two real ``gloo`` ranks) against TP=1 on the same weights.

One spawn of two processes runs every architecture (``tensor_parallel_cases``) while
this process computes the TP=1 references; a deadline kills the ranks, so a collective
that never pairs up fails the tests instead of hanging them.
"""

from __future__ import annotations

import multiprocessing
import socket
import time
from dataclasses import replace

import pytest
import torch
from tensor_parallel_cases import CASES, build_folders, rank_main, run_case

from prefixcache.models.config import ModelConfig
from prefixcache.models.loader import load_model
from prefixcache.models.parallel import TensorParallel

_DEADLINE_S = 300
_NAMES = [*CASES, "bench-qwen3-moe"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _references(folders):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the two ranks use the other cores
    try:
        return {name: run_case(folder, None) for name, folder in folders.items()}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(TP=1 results, rank 0's TP=2 results, rank 1's) per case name."""
    folders = build_folders(tmp_path_factory.mktemp("tp-models"))
    out = tmp_path_factory.mktemp("tp-results")
    spawn = multiprocessing.get_context("spawn")
    port = _free_port()
    ranks = [spawn.Process(target=rank_main, args=(r, port, folders, out)) for r in range(2)]
    for rank in ranks:
        rank.start()
    try:
        reference = _references(folders)
        deadline = time.monotonic() + _DEADLINE_S
        for rank in ranks:
            rank.join(max(0.0, deadline - time.monotonic()))
    finally:
        for rank in ranks:
            if rank.is_alive():
                rank.kill()
                rank.join()
    codes = [rank.exitcode for rank in ranks]
    assert codes == [0, 0], f"tensor-parallel ranks exited with {codes}"
    return reference, *(torch.load(out / f"rank{r}.pt") for r in range(2))


@pytest.mark.parametrize("name", _NAMES)
def test_tp2_logits_match_tp1_on_every_rank(runs, name):
    reference, *ranks = runs
    for sharded in ranks:
        for part in ("prefill", "decode"):
            assert sharded[name][part].shape == reference[name][part].shape
            torch.testing.assert_close(
                sharded[name][part], reference[name][part], atol=1e-4, rtol=0
            )


@pytest.mark.parametrize("name", _NAMES)
def test_tp2_greedy_ids_equal_tp1(runs, name):
    reference, rank0, _ = runs
    assert torch.equal(rank0[name]["ids"], reference[name]["ids"])


@pytest.mark.parametrize("name", _NAMES)
def test_each_rank_reads_only_the_slices_it_holds(runs, name):
    reference, *ranks = runs
    for sharded in ranks:
        assert sharded[name]["whole_tensors"] == 0
        assert sharded[name]["elements"] == sharded[name]["held"]
        assert sharded[name]["held"] < 0.6 * reference[name]["held"]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from prefixcache.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tp-errors") / "llama", "llama")


def _load(folder, parallel, **changes):
    config = replace(ModelConfig.from_folder(folder), **changes)
    return load_model(folder, config, torch.float32, torch.device("cpu"), "auto", parallel)


def test_query_heads_not_divisible_by_size_is_a_clear_error(llama_folder):
    with pytest.raises(ValueError, match=r"attention heads \(4\) is not divisible .* size \(3\)"):
        _load(llama_folder, TensorParallel(rank=0, size=3))


def test_kv_heads_neither_divisor_nor_multiple_of_size_is_a_clear_error(llama_folder):
    neither = r"size \(4\) is neither a divisor nor a multiple .* KV heads \(3\)"
    with pytest.raises(ValueError, match=neither):
        _load(llama_folder, TensorParallel(rank=0, size=4), num_heads=12, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"KV heads \(6\) is not divisible .* size \(4\)"):
        _load(llama_folder, TensorParallel(rank=0, size=4), num_heads=12, num_kv_heads=6)


def test_intermediate_size_not_divisible_by_size_is_a_clear_error(llama_folder):
    with pytest.raises(ValueError, match=r"intermediate_size \(129\) is not divisible"):
        _load(llama_folder, TensorParallel(rank=1, size=2), intermediate_size=129)


def test_rank_outside_the_group_is_refused():
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, 2\)"):
        TensorParallel(rank=2, size=2)
    with pytest.raises(ValueError, match="size must be >= 1"):
        TensorParallel(rank=0, size=0)


def test_size_one_is_the_unsharded_model(llama_folder):
    single = _load(llama_folder, TensorParallel(rank=0, size=1))
    plain = _load(llama_folder, None)
    pairs = list(zip(single.named_parameters(), plain.named_parameters(), strict=True))
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in pairs)
