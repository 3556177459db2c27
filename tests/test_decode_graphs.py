"""Which steps the decode graphs take, and which engines get them (the replay itself is
checked against eager decode in ``test_triton_kernels.py``, on CUDA and interpreted)."""

from __future__ import annotations

from prefixcache import Engine
from prefixcache.engine.cuda_graphs import DecodeGraphs, unsupported_reason
from prefixcache.engine.model_runner import SequenceChunk


def _runner(folder):
    engine = Engine.from_pretrained(str(folder), device="cpu", dtype="float32")
    return engine.core.runner


def test_buckets_end_at_max_num_seqs(tiny_llama):
    runner = _runner(tiny_llama)
    assert DecodeGraphs(runner, 3, 256, capture=False).buckets == [1, 2, 3]
    assert DecodeGraphs(runner, 40, 256, capture=False).buckets == [1, 2, 4, 8, 16, 24, 32, 40]


def test_only_decode_steps_within_the_buckets_are_taken(tiny_llama):
    graphs = DecodeGraphs(_runner(tiny_llama), 4, 256, capture=False)
    decode = SequenceChunk([5], 20, [0, 1])
    assert graphs.can_run([decode] * 4)
    assert not graphs.can_run([decode] * 5)  # more sequences than the largest bucket
    assert not graphs.can_run([decode, SequenceChunk([5, 6], 20, [0, 1])])  # a prefill
    assert not graphs.can_run([SequenceChunk([5], 20, [0, 1], long_rope=True)])
    assert not graphs.can_run([SequenceChunk([5], 256, list(range(17)))])  # past the length
    assert not graphs.can_run([])


def test_cpu_engines_decode_eagerly(tiny_llama):
    runner = _runner(tiny_llama)
    assert runner.graphs is None
    assert unsupported_reason(runner) == "not on a CUDA device"
