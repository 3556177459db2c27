"""GPU check of the paged-attention kernels: correctness at real sizes, then timings.

    python bench/gpu_check.py [--out bench/out] [--skip-e2e]   # a CUDA GPU, ~3-5 min on an H100
    python bench/gpu_check.py --smoke                           # tiny CPU dry run (interpreter)

At Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128, bf16,
16-token blocks) and contexts of 4k, 32k and 200k tokens it
1. checks the Triton kernels (KV write, prefill over a cached prefix, split-K decode)
   against the torch reference (relative L2 error of the output);
2. times decode attention at each context as bytes of K/V read per second, against the
   measured device copy bandwidth (goal: >= 70% at 200k);
3. times prefill of 2k new tokens over a 200k cached prefix against torch SDPA (flash,
   non-causal, K/V contiguous and repeated per query head: slightly more work than
   ours) on the same shape (goal: >= 0.6x SDPA's speed), and a chat turn's 32 new
   tokens over 200k with the kernel split over the keys against one part;
4. runs an end-to-end second turn at 200k context on the Llama-3.1-8B config with
   dummy weights (config written locally, nothing downloaded), then 32 short prompts
   decoding together, from CUDA graphs and eagerly; when the prefill timing
   of step 3 says turn one would take longer than ``--e2e-budget-s``, at the longest
   context that fits the budget (the JSON says which, and why);
5. times onloading KV blocks of that shape from pinned host memory, alone and while
   the compute stream is busy, with the copies on the side stream (as the host tier
   makes them) and on the compute stream, which shows what the side stream overlaps;
6. tries a few tile shapes for both kernels and reports the fastest;
7. with two or more GPUs visible (``--smoke``: two CPU ranks over gloo), runs the
   engine at ``tensor_parallel_size`` 2 against one rank on the same tiny weights
   (greedy ids identical, logprobs within 1e-4 in float32), then a second turn on the
   Llama-3.1-8B config sharded over the GPUs; skipped with the reason otherwise.
It writes ``gpu_check.json`` under ``--out`` after every section and prints a table last.
"""

# ruff: noqa: E402
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

if "--smoke" in sys.argv[1:]:
    # Triton chooses compiled or interpreted kernels when it is first imported.
    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from report import markdown_table

from kernels import AttentionMetadata
from kernels.torch_ref import TorchReferenceBackend
from kernels.triton_backend import (
    DecodeTiles,
    PrefillTiles,
    TritonBackend,
    default_prefill_tiles,
)


class Shapes(NamedTuple):
    """Sizes of one run: real Llama-3.1-8B attention on a GPU, or tiny for --smoke."""

    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    contexts: tuple[int, ...]
    new_tokens: int
    dtype: torch.dtype
    device: str


REAL = Shapes(32, 8, 128, 16, (4096, 32768, 200_000), 2048, torch.bfloat16, "cuda")
SMOKE = Shapes(4, 2, 16, 16, (40, 100, 300), 24, torch.float32, "cpu")
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4}
PREFILL_SWEEP = [
    PrefillTiles(*t)
    for t in [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 3)]
]
DECODE_SWEEP = [
    DecodeTiles(*t)
    for t in [(64, 0, 4, 3), (64, 0, 4, 4), (32, 0, 4, 4), (128, 0, 8, 3), (64, 4096, 4, 3)]
]
LLAMA_31_8B = {  # config.json of meta-llama/Llama-3.1-8B, written locally (no download)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "rope_scaling": {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    # The real model stops at 131072 positions; raised so a 200k context is accepted.
    "max_position_embeddings": 262144, "vocab_size": 128256, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
}  # fmt: skip


class Step(NamedTuple):
    """One attention step: new q/k/v, the pools, and the metadata that ties them."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata


def make_step(shapes: Shapes, query_lens, seq_lens, dtype=None, seed: int = 0) -> Step:
    """Random pools exactly large enough, block tables scattered over them."""
    dtype, device = dtype or shapes.dtype, shapes.device
    bs = shapes.block_size
    counts = [-(-s // bs) for s in seq_lens]
    order = torch.randperm(sum(counts), generator=torch.Generator().manual_seed(seed)).tolist()
    tables = [order[sum(counts[:i]) : sum(counts[: i + 1])] for i in range(len(counts))]
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, bs, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    pool = (sum(counts), bs, shapes.kv_heads, shapes.head_dim)
    tokens = sum(query_lens)
    q = rand(tokens, shapes.heads, shapes.head_dim)
    k, v = (
        rand(tokens, shapes.kv_heads, shapes.head_dim),
        rand(tokens, shapes.kv_heads, shapes.head_dim),
    )
    return Step(q, k, v, rand(*pool), rand(*pool), meta)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``|out - ref| / |ref|`` in the L2 norm over all elements."""
    ref = ref.float()
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_case(name: str, step: Step, backend=None) -> dict:
    """Forward the step through the Triton backend and the reference; compare both."""
    backend = backend or TritonBackend()
    q, k, v, k_cache, v_cache, meta = step
    scale = q.shape[-1] ** -0.5
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    out = backend.forward(q, k, v, k_cache, v_cache, meta, scale)
    ref = TorchReferenceBackend().forward(q, k, v, ref_k, ref_v, meta, scale)
    error = relative_error(out, ref)
    pools_equal = torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    ok = pools_equal and error <= TOLERANCE[q.dtype]
    return {"check": name, "rel_error": error, "pools_equal": pools_equal, "ok": ok}


def check_kernels(shapes: Shapes) -> list[dict]:
    """Each kernel against the reference at every context, alone and mixed in a batch."""
    ctx, new = shapes.contexts, shapes.new_tokens
    part = max(1, new // 4)
    names = "/".join(_k(c) for c in ctx)
    cases = [
        (f"decode at {names} (one batch)", [1] * len(ctx), list(ctx), None),
        (f"prefill {part} new over {names}", [part] * len(ctx), list(ctx), None),
        (f"prefill {_k(new)} new over {_k(ctx[-1])}", [new], [ctx[-1] + new], None),
        ("mixed decode + prefill batch", [1, part, 1], [ctx[-1], ctx[1], ctx[0]], None),
        (
            f"prefill {QUESTION_TOKENS} new over {_k(ctx[-1])} (split over the keys)",
            [QUESTION_TOKENS],
            [ctx[-1] + QUESTION_TOKENS],
            None,
        ),
        (f"float32 decode + prefill at {_k(ctx[0])}", [1, part], [ctx[0], ctx[0]], torch.float32),
    ]
    rows = []
    for name, query_lens, seq_lens, dtype in cases:
        rows.append(check_case(name, make_step(shapes, query_lens, seq_lens, dtype)))
        _log(f"check {name}: {rows[-1]}")
    return rows


def device_timer(fn, cuda: bool, repeats: int = 5, inner: int = 10) -> float:
    """Median milliseconds per call of ``fn`` (CUDA events; one wall-clock call on CPU)."""
    fn()  # warm-up and compile
    samples = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return sorted(samples)[len(samples) // 2]


def copy_bandwidth(shapes: Shapes) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    numel = (1 << 29) if shapes.device == "cuda" else (1 << 22)
    src = torch.empty(numel, dtype=torch.float16, device=shapes.device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = device_timer(lambda: dst.copy_(src), src.is_cuda)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def time_decode(shapes: Shapes, copy_gbs: float, tiles: DecodeTiles | None = None) -> list[dict]:
    """Decode attention of one sequence at each context, as achieved K/V bandwidth."""
    rows = []
    for ctx in shapes.contexts:
        step = make_step(shapes, [1], [ctx])
        ms = _time_attend(TritonBackend(decode_tiles=tiles), step)
        kv_bytes = 2 * ctx * shapes.kv_heads * shapes.head_dim * step.k_cache.element_size()
        gbs = kv_bytes / ms / 1e6
        rows.append({"context": ctx, "ms": ms, "GB/s": gbs, "of_copy_bw": gbs / copy_gbs})
        _log(f"decode {_k(ctx)}: {rows[-1]}")
    return rows


def time_prefill(shapes: Shapes, tiles: PrefillTiles | None = None) -> dict:
    """Prefill of new tokens over the longest prefix, against SDPA on contiguous K/V."""
    new, prefix = shapes.new_tokens, shapes.contexts[-1]
    step = make_step(shapes, [new], [prefix + new])
    ours = _time_attend(TritonBackend(prefill_tiles=tiles), step)
    group = shapes.heads // shapes.kv_heads
    keys = _contiguous_keys(step.k_cache, step.meta, prefix + new, group)
    values = _contiguous_keys(step.v_cache, step.meta, prefix + new, group)
    query = step.q.transpose(0, 1).unsqueeze(0)  # [1, heads, new, d]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    theirs = device_timer(lambda: sdpa(query, keys, values), query.is_cuda, repeats=3, inner=3)
    flops = 4 * shapes.heads * shapes.head_dim * new * (prefix + (new + 1) / 2)
    return {
        "new_tokens": new, "prefix": prefix, "triton_ms": ours, "sdpa_ms": theirs,
        "triton_tflops": flops / ours / 1e9, "speed_vs_sdpa": theirs / ours,
    }  # fmt: skip


def time_short_prefill(shapes: Shapes) -> dict:
    """A chat turn's few new tokens over the longest prefix: the kernel split over the
    keys (the default) against one program per query tile walking every key."""
    prefix = shapes.contexts[-1]
    step = make_step(shapes, [QUESTION_TOKENS], [prefix + QUESTION_TOKENS])
    split = _time_attend(TritonBackend(), step)
    whole = PrefillTiles(*default_prefill_tiles(shapes.head_dim, shapes.dtype,
                                                torch.device(shapes.device))[:4],
                         partition=-(-(prefix + QUESTION_TOKENS) // 64) * 64)  # fmt: skip
    one_part = _time_attend(TritonBackend(prefill_tiles=whole), step)
    return {"new_tokens": QUESTION_TOKENS, "prefix": prefix, "split_ms": split,
            "one_part_ms": one_part, "speedup": one_part / split}  # fmt: skip


def sweep_tiles(shapes: Shapes, copy_gbs: float, smoke: bool) -> dict:
    """Time a few launch shapes of both kernels at the longest context; keep the fastest."""
    prefill_sweep, decode_sweep = (
        (PREFILL_SWEEP[:1], DECODE_SWEEP[:1]) if smoke else (PREFILL_SWEEP, DECODE_SWEEP)
    )
    ctx, new = shapes.contexts[-1], shapes.new_tokens
    prefill = [
        _try_tiles(shapes, [new], [ctx + new], TritonBackend(prefill_tiles=t), t)
        for t in prefill_sweep
    ]
    decode = [
        _try_tiles(shapes, [1], [ctx], TritonBackend(decode_tiles=t), t) for t in decode_sweep
    ]
    kv_bytes = 2 * ctx * shapes.kv_heads * shapes.head_dim * shapes.dtype.itemsize
    for row in decode:
        row["of_copy_bw"] = kv_bytes / row["ms"] / 1e6 / copy_gbs if row.get("ms") else None
    return {
        "prefill": prefill,
        "decode": decode,
        "best_prefill": _fastest(prefill),
        "best_decode": _fastest(decode),
    }


QUESTION_TOKENS = 32  # a chat turn's new question: the turn-two target's case


def run_e2e(shapes: Shapes, context: int) -> dict:
    """Turn one fills a ~``context`` prompt; turn two adds a short question and reuses
    it (the < 100 ms target), turn three a long one (``new_tokens``); then a batch of
    short prompts decodes together (the per-step cost CUDA graphs would cut)."""
    from prefixcache import Engine

    folder = Path(tempfile.mkdtemp(prefix="gpu-check-model-"))
    try:
        model = _write_model_folder(folder, shapes.device != "cuda")
        room = 2 * shapes.new_tokens + 1024
        engine = Engine.from_pretrained(
            str(model), device=shapes.device, dtype=shapes.dtype, load_format="dummy",
            attention_backend="triton", max_model_len=context + room,
            kv_cache_tokens=context + 2 * room,
        )  # fmt: skip
        rng = random.Random(0)
        vocab = min(engine.model_config.vocab_size, 100_000)

        def words(n: int) -> list[int]:
            return [rng.randrange(100, vocab) for _ in range(n)]

        prompt = words(context - QUESTION_TOKENS - 16)
        turns = {}
        for name, new, max_tokens in (("turn1", 0, 16), ("turn2", QUESTION_TOKENS, 32),
                                      ("turn3", shapes.new_tokens, 16)):  # fmt: skip
            prompt = prompt + words(new)
            turns[name] = _timed_request(engine, prompt, max_tokens)
            prompt = prompt + turns[name].pop("token_ids")
            _log(f"e2e {name}: {turns[name]}")
        count, length = (32, 512) if shapes.device == "cuda" else (4, 32)
        turns["batch"] = _timed_batch(engine, [words(length) for _ in range(count)], 32)
        _log(f"e2e batch: {turns['batch']}")
        runner = engine.core.runner
        graphs, runner.graphs = runner.graphs, None  # the same steps, eagerly
        turns["batch_eager"] = _timed_batch(engine, [words(length) for _ in range(count)], 32)
        runner.graphs = graphs
        turns["cuda_graphs"] = graphs is not None
        _log(f"e2e batch, eager: {turns['batch_eager']}")
        turns["batch_profile"] = _profile_decode(engine, [words(length) for _ in range(count)])
        return {"context": turns["turn2"]["prompt_tokens"], **turns}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _timed_batch(engine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Prompts added together; milliseconds per step once all of them decode."""
    from prefixcache import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    steps = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        deltas = engine.step()
        if len(deltas) == len(prompts) and all(d.token_ids for d in deltas):
            steps.append(time.perf_counter() - start)
    steps = sorted(steps[1:]) or [float("nan")]  # the first full step still prefills
    return {"sequences": len(prompts), "prompt_tokens": len(prompts[0]), "decode_steps": len(steps),
            "step_ms_p50": steps[len(steps) // 2] * 1e3}  # fmt: skip


def _profile_decode(engine, prompts: list[list[int]], steps: int = 4) -> str:
    """torch.profiler's table (top ops by CPU time) over a few decode steps of a batch."""
    from prefixcache import SamplingParams

    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(max_tokens=8 + steps, ignore_eos=True))
    for _ in range(4):  # prefill and the first decode steps, outside the profile
        engine.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    _log(f"decode profile ({steps} steps):\n{table}")
    return table


def e2e_context(shapes: Shapes, prefill: dict | None, requested: int, budget_s: float):
    """The turn-two context to run: ``requested``, or less when the measured prefill
    speed says turn one (every layer's attention over the growing prefix) would not
    finish within ``budget_s``. Returns (context, why)."""
    if shapes.device != "cuda" or not prefill or "triton_ms" not in prefill:
        return requested, "as requested"
    per_token_key_s = prefill["triton_ms"] / 1e3 / (prefill["new_tokens"] * prefill["prefix"])
    layers = LLAMA_31_8B["num_hidden_layers"]

    def turn_one_s(context: int) -> float:  # causal: context^2 / 2 query-key pairs
        return per_token_key_s * context * context / 2 * layers

    context = requested
    while context > 8192 and turn_one_s(context) > budget_s:
        context = int(context * 0.8)
    estimate = f"turn one's attention estimated at {turn_one_s(context):.0f} s"
    if context == requested:
        return context, f"as requested; {estimate}"
    return context, f"{_k(requested)} would take ~{turn_one_s(requested):.0f} s; {estimate}"


ONLOAD_BLOCKS = 1024  # 16k tokens of KV


def time_onload(shapes: Shapes) -> dict:
    """Blocks from pinned host memory into the device pools: alone (bandwidth), and
    while the compute stream runs matrix products, on the side stream and not."""
    from prefixcache.tiers.transfer import KVTransfer

    layers = LLAMA_31_8B["num_hidden_layers"] if shapes.device == "cuda" else 2
    count = ONLOAD_BLOCKS if shapes.device == "cuda" else 8
    pool = (2 * count, shapes.block_size, shapes.kv_heads, shapes.head_dim)
    device_layers = [
        (torch.zeros(pool, dtype=shapes.dtype, device=shapes.device),
         torch.zeros(pool, dtype=shapes.dtype, device=shapes.device))
        for _ in range(layers)
    ]  # fmt: skip
    transfer = KVTransfer(device_layers)
    host = torch.empty(
        transfer.copy_shape(count), dtype=shapes.dtype, pin_memory=shapes.device == "cuda"
    )
    host.copy_(torch.randn(host.shape, dtype=shapes.dtype, device=shapes.device))
    targets = list(range(0, 2 * count, 2))  # every other block: scattered writes
    size = 8192 if shapes.device == "cuda" else 64
    a = torch.randn(size, size, dtype=shapes.dtype, device=shapes.device)

    def compute():
        for _ in range(8):
            a @ a

    def onload():
        transfer.write(host, targets)

    def side():
        with transfer.copying():
            onload()

    def both(copy):
        compute()
        copy()

    cuda = shapes.device == "cuda"
    times = {
        "copy_ms": device_timer(side, cuda, repeats=3, inner=3),
        "compute_ms": device_timer(compute, cuda, repeats=3, inner=3),
        "both_side_stream_ms": device_timer(lambda: both(side), cuda, repeats=3, inner=3),
        "both_one_stream_ms": device_timer(lambda: both(onload), cuda, repeats=3, inner=3),
    }
    moved = host.numel() * host.element_size()
    correct = all(
        torch.equal(device_layers[layer][kv][targets[i]].cpu(), host[layer, kv, i])
        for layer, kv, i in ((0, 0, 0), (layers - 1, 1, count - 1), (layers // 2, 1, count // 3))
    )
    hidden = times["copy_ms"] + times["compute_ms"] - times["both_side_stream_ms"]
    return {
        "blocks": count, "MiB": moved / 2**20, **times, "GBps": moved / times["copy_ms"] / 1e6,
        "copy_hidden_by_side_stream": hidden / times["copy_ms"], "written_correctly": correct,
    }  # fmt: skip


def _timed_request(engine, prompt: list[int], max_tokens: int) -> dict:
    from prefixcache import SamplingParams

    start = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    first, cached, tokens = None, 0, []
    while engine.has_unfinished_requests():
        for delta in engine.step():
            first = first if first is not None else time.perf_counter()
            cached = delta.num_cached_tokens
            tokens += delta.token_ids
    end = time.perf_counter()
    decode_ms = (end - first) / max(1, len(tokens) - 1) * 1e3
    return {
        "prompt_tokens": len(prompt), "cached_tokens": cached, "ttft_s": first - start,
        "decode_ms_per_token": decode_ms, "token_ids": tokens,
    }  # fmt: skip


CHECKED_GOALS = ("<= tol", "runs", "written correctly")  # the exit status's rows
TP_TOLERANCE = 1e-4  # float32 logprobs, sums split over ranks


def run_tensor_parallel(shapes: Shapes, context: int) -> dict:
    """TP=2 against one rank on the same tiny weights, then a sharded e2e second turn."""
    from prefixcache import Engine, SamplingParams
    from prefixcache.testing import make_tiny_model

    gpus = torch.cuda.device_count() if shapes.device == "cuda" else 2
    if gpus < 2:
        return {"skipped": f"needs 2 or more GPUs, {gpus} visible"}
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-tp-"))
    try:
        tiny = str(make_tiny_model(folder / "tiny"))
        params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=True)
        prompts = [
            [random.Random(i).randrange(3, 200) for _ in range(40 + 30 * i)] for i in range(3)
        ]
        outs = {}
        for size in (1, 2):
            with Engine.from_pretrained(
                tiny, device=shapes.device, dtype="float32", tensor_parallel_size=size,
                kv_cache_tokens=4096,
            ) as engine:  # fmt: skip
                outs[size] = engine.generate(prompts, params)
        pairs = list(zip(outs[1], outs[2], strict=True))
        diff = max(
            abs(x - y) for a, b in pairs for x, y in zip(a.logprobs, b.logprobs, strict=True)
        )
        same = all(a.token_ids == b.token_ids for a, b in pairs)
        result = {"size": 2, "same_greedy_ids": same, "max_logprob_diff": diff}
        if shapes.device == "cuda":
            result["e2e"] = _tensor_parallel_e2e(folder, min(gpus, 8), context)
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _tensor_parallel_e2e(folder: Path, size: int, context: int) -> dict:
    """Turn one and a reusing turn two on the Llama-3.1-8B config over ``size`` GPUs."""
    from prefixcache import Engine

    model = _write_model_folder(folder / "8b", smoke=False)
    with Engine.from_pretrained(
        str(model), device="cuda", dtype=torch.bfloat16, load_format="dummy",
        max_model_len=context + 1024, kv_cache_tokens=context + 2048, tensor_parallel_size=size,
    ) as engine:  # fmt: skip
        rng = random.Random(0)
        turn1 = [rng.randrange(100, 100_000) for _ in range(context - 512)]
        first = _timed_request(engine, turn1, max_tokens=16)
        turn2 = turn1 + first.pop("token_ids") + [rng.randrange(100, 100_000) for _ in range(256)]
        second = _timed_request(engine, turn2, max_tokens=32)
        second.pop("token_ids")
    return {"size": size, "context": len(turn2), "turn1": first, "turn2": second}


def _write_model_folder(folder: Path, smoke: bool) -> Path:
    """A tiny model's tokenizer files next to the Llama-3.1-8B config (no weights needed)."""
    from prefixcache.testing import make_tiny_model

    tiny = make_tiny_model(folder / "tiny")
    if smoke:
        return tiny
    model = folder / "llama-3.1-8b-config"
    model.mkdir(parents=True)
    for path in tiny.iterdir():
        if path.name.startswith(("tokenizer", "chat_template", "generation_config")):
            shutil.copy(path, model / path.name)
    special = json.loads((tiny / "config.json").read_text())
    ids = {key: special[key] for key in ("bos_token_id", "eos_token_id") if key in special}
    (model / "config.json").write_text(json.dumps({**LLAMA_31_8B, **ids}, indent=2))
    return model


def _time_attend(backend, step: Step) -> float:
    q, _, _, k_cache, v_cache, meta = step
    scale = q.shape[-1] ** -0.5
    return device_timer(lambda: backend.attend(q, k_cache, v_cache, meta, scale), q.is_cuda)


def _try_tiles(shapes: Shapes, query_lens, seq_lens, backend, tiles) -> dict:
    row = {"tiles": tiles._asdict()}
    try:
        step = make_step(shapes, query_lens, seq_lens)
        row["rel_error"] = check_case("sweep", step, backend)["rel_error"]
        row["ms"] = _time_attend(backend, step)
    except Exception as exc:  # a shape may not fit shared memory on this GPU
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    _log(f"sweep {row}")
    return row


def _fastest(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r.get("ms") and r["rel_error"] <= 1e-2]
    return min(ok, key=lambda r: r["ms"]) if ok else None


def _contiguous_keys(cache: torch.Tensor, meta: AttentionMetadata, length: int, group: int):
    """One sequence's paged K or V as ``[1, heads, length, d]`` (repeated per query head)."""
    flat = cache[meta.block_tables[0].long()].flatten(0, 1)[:length]  # [length, kvh, d]
    return flat.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _k(tokens: int) -> str:
    return f"{tokens // 1000}k" if tokens >= 1000 else str(tokens)


def _log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _row(item: str, value: str, goal: str = "", ok: bool | str = "") -> dict:
    return {"item": item, "value": value, "goal": goal, "ok": ok}


def _summary_rows(results: dict) -> list[dict]:
    """The short table printed last: one row per check, timing and goal."""
    rows = [_row(f"section {name}", v["error"][:80], "runs", False)
            for name, v in results.items() if isinstance(v, dict) and "error" in v]  # fmt: skip
    for c in _listed(results, "checks"):
        rows.append(_row(c["check"], f"rel err {c['rel_error']:.1e}", "<= tol", c["ok"]))
    if isinstance(results.get("copy_GBps"), float):
        rows.append(_row("device copy bandwidth", f"{results['copy_GBps']:.0f} GB/s"))
    decode = _listed(results, "decode")
    for d in decode:
        value = f"{d['ms']:.3f} ms, {d['GB/s']:.0f} GB/s = {d['of_copy_bw']:.0%} of copy"
        goal, ok = (">= 70% of copy", d["of_copy_bw"] >= 0.7) if d is decode[-1] else ("", "")
        rows.append(_row(f"decode attention at {_k(d['context'])}", value, goal, ok))
    if "triton_ms" in (p := results.get("prefill") or {}):
        value = (f"{p['triton_ms']:.2f} ms vs SDPA {p['sdpa_ms']:.2f} ms = "
                 f"{p['speed_vs_sdpa']:.2f}x ({p['triton_tflops']:.0f} TFLOP/s)")  # fmt: skip
        item = f"prefill {_k(p['new_tokens'])} over {_k(p['prefix'])}"
        rows.append(_row(item, value, ">= 0.6x SDPA", p["speed_vs_sdpa"] >= 0.6))
    if "split_ms" in (short := results.get("short_prefill") or {}):
        value = (f"{short['split_ms']:.3f} ms split over the keys vs {short['one_part_ms']:.3f} "
                 f"ms whole = {short['speedup']:.1f}x")  # fmt: skip
        rows.append(_row(f"prefill {short['new_tokens']} over {_k(short['prefix'])}", value))
    for kind in ("prefill", "decode"):
        if best := (results.get("sweep") or {}).get(f"best_{kind}"):
            value = f"{tuple(best['tiles'].values())}: {best['ms']:.3f} ms"
            rows.append(_row(f"fastest {kind} tiles", value))
    rows += _e2e_rows(results.get("e2e") or {}) + _onload_rows(results.get("onload") or {})
    return rows + _tp_rows(results.get("tensor_parallel"))


def _onload_rows(onload: dict) -> list[dict]:
    if "copy_ms" not in onload:
        return []
    value = f"{onload['MiB']:.0f} MiB in {onload['copy_ms']:.2f} ms = {onload['GBps']:.1f} GB/s"
    overlap = (
        f"{onload['both_side_stream_ms']:.2f} ms on the side stream vs "
        f"{onload['both_one_stream_ms']:.2f} ms on one (compute alone "
        f"{onload['compute_ms']:.2f} ms): "
        f"{onload['copy_hidden_by_side_stream']:.0%} of the copy hidden"
    )
    return [
        _row("host -> device onload", value, "written correctly", onload["written_correctly"]),
        _row("onload while computing", overlap),
    ]


def _tp_rows(tp: dict | None) -> list[dict]:
    if not tp or "error" in tp:
        return []
    if "skipped" in tp:
        return [_row("tensor parallel", f"skipped: {tp['skipped']}")]
    value = f"ids {'equal' if tp['same_greedy_ids'] else 'DIFFER'}, logprobs within "
    value += f"{tp['max_logprob_diff']:.1e}"
    ok = tp["same_greedy_ids"] and tp["max_logprob_diff"] <= TP_TOLERANCE
    rows = [_row(f"TP={tp['size']} vs one rank, tiny weights", value, "<= tol", ok)]
    if e2e := tp.get("e2e"):
        t2 = e2e["turn2"]
        value = (f"TTFT {t2['ttft_s']:.2f} s, {t2['cached_tokens']} cached, "
                 f"decode {t2['decode_ms_per_token']:.1f} ms/token")  # fmt: skip
        item = f"e2e TP={e2e['size']} turn 2 at {_k(e2e['context'])}"
        rows.append(_row(item, value, "reuses turn 1", t2["cached_tokens"] > 0))
    return rows


def _e2e_rows(e2e: dict) -> list[dict]:
    if "turn2" not in e2e:
        return []
    rows = [_row(f"e2e turn 1, {_k(e2e['turn1']['prompt_tokens'])} cold",
                 f"TTFT {e2e['turn1']['ttft_s']:.2f} s")]  # fmt: skip
    for name, goal in (("turn2", "< 100 ms"), ("turn3", "")):
        if name not in e2e:
            continue
        t = e2e[name]
        new = t["prompt_tokens"] - t["cached_tokens"]
        value = (f"TTFT {t['ttft_s'] * 1e3:.0f} ms, {new} new over {t['cached_tokens']} "
                 f"cached, decode {t['decode_ms_per_token']:.1f} ms/token")  # fmt: skip
        ok = t["ttft_s"] < 0.1 if goal else ""
        rows.append(_row(f"e2e {name} at {_k(t['prompt_tokens'])}", value, goal, ok))
    if batch := e2e.get("batch"):
        value = f"{batch['step_ms_p50']:.1f} ms per step (p50 of {batch['decode_steps']})"
        if eager := e2e.get("batch_eager"):
            graphs = "CUDA graphs" if e2e.get("cuda_graphs") else "no graphs captured"
            value += f" ({graphs}); eager {eager['step_ms_p50']:.1f} ms"
        item = f"decode, {batch['sequences']} sequences of {batch['prompt_tokens']}"
        rows.append(_row(item, value))
    return rows


def _listed(results: dict, key: str) -> list[dict]:
    value = results.get(key)
    return value if isinstance(value, list) else []


def main(argv: list[str] | None = None) -> int:
    """Run every section, write JSON after each, print the table last; 0 when all pass."""
    args = _parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(
            "gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); run it "
            "with --smoke for a tiny CPU dry run under Triton's interpreter.",
            file=sys.stderr,
        )
        return 2
    shapes = SMOKE if args.smoke else REAL
    results = {
        "device": torch.cuda.get_device_name() if shapes.device == "cuda" else "cpu interpreter",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "shapes": {**shapes._asdict(), "dtype": str(shapes.dtype)},
    }
    out = Path(args.out) / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for name, run in _sections(args, shapes, results):
        _log(f"section {name} starts at {time.perf_counter() - started:.0f} s")
        try:
            value = run()
        except Exception as exc:  # keep what the other sections measured
            value = {"error": f"{type(exc).__name__}: {exc}"}
            _log(f"section {name} failed: {value['error']}")
        if value is not None:
            results[name] = value
        results["elapsed_s"] = time.perf_counter() - started
        out.write_text(json.dumps(results, indent=2, default=str))
        if shapes.device == "cuda":
            torch.cuda.empty_cache()
    rows = _summary_rows(results)
    print(f"wrote {out} after {results['elapsed_s']:.0f} s")
    print(markdown_table(rows))
    return 0 if all(r["ok"] is not False for r in rows if r["goal"] in CHECKED_GOALS) else 1


def _sections(args, shapes: Shapes, results: dict) -> list:
    e2e_context = SMOKE.contexts[-1] if args.smoke else args.e2e_context
    sweep = not args.skip_sweep
    return [
        ("checks", lambda: check_kernels(shapes)),
        ("copy_GBps", lambda: copy_bandwidth(shapes)),
        ("decode", lambda: time_decode(shapes, results["copy_GBps"])),
        ("prefill", lambda: time_prefill(shapes)),
        ("short_prefill", lambda: time_short_prefill(shapes)),
        ("e2e", lambda: None if args.skip_e2e else _e2e(args, shapes, results, e2e_context)),
        ("onload", lambda: time_onload(shapes)),
        ("sweep", lambda: sweep_tiles(shapes, results["copy_GBps"], args.smoke) if sweep else None),
        ("tensor_parallel", lambda: run_tensor_parallel(shapes, min(e2e_context, 32_768))),
    ]


def _e2e(args, shapes: Shapes, results: dict, requested: int) -> dict:
    context, why = e2e_context(shapes, results.get("prefill"), requested, args.e2e_budget_s)
    _log(f"e2e at {_k(context)}: {why}")
    return {"requested_context": requested, "why": why, **run_e2e(shapes, context)}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run under the interpreter")
    parser.add_argument("--out", default="bench/out", help="folder for gpu_check.json")
    parser.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end engine run")
    parser.add_argument("--skip-sweep", action="store_true", help="skip the tile-shape sweep")
    parser.add_argument("--e2e-context", type=int, default=200_000, help="turn-two context")
    parser.add_argument(
        "--e2e-budget-s", type=float, default=120.0,
        help="seconds turn one may take; a shorter context is run when more is predicted",
    )  # fmt: skip
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
