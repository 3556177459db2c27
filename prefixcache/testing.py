"""Tiny but real Hugging Face model folders for tests and benchmarks.

`make_tiny_model` writes a folder that `transformers` loads like any checkpoint: a
byte-level BPE tokenizer with a ChatML chat template, a config, and random float32
weights whose logits are spread wide enough that greedy decoding rarely meets a tie.
Nothing is downloaded; the tokenizer is trained on a corpus generated here.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from prefixcache.tiny_templates import (  # noqa: F401  (re-exported names)
    CHAT_STYLES,
    CHATML_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    ChatStyle,
)

# Bump when the folder contents change, so stamped folders from older builds are remade.
_FORMAT_VERSION = 1
_STAMP_NAME = "prefixcache-tiny.json"
_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
_VOCAB_SIZE = 768
# The Qwen2 / Llama 3 pre-tokenizer. transformers rebuilds Qwen2 tokenizers with this
# split and an NFC normalizer whatever tokenizer.json says, so every arch uses both and
# AutoTokenizer encodes the same way for all of them.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LOGIT_SCALE = 20.0
# Router logits are scaled up likewise, so that no token sits on a near-tie between two
# experts, where rounding noise alone could flip its routing.
_ROUTER_SCALE = 25.0
_MAX_POSITIONS = 262144


class TinyArch(NamedTuple):
    """How to build one architecture: transformers class names and config defaults."""

    config_class: str
    model_class: str
    defaults: dict[str, Any]
    head_dim_in_config: bool = True


ARCHITECTURES: dict[str, TinyArch] = {
    "llama": TinyArch("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": TinyArch("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    # Qwen2 always has q/k/v biases in transformers, and its real configs carry no
    # head_dim: the engine must derive both from the architecture, as for real models.
    "qwen2": TinyArch("Qwen2Config", "Qwen2ForCausalLM", {}, head_dim_in_config=False),
    "qwen3": TinyArch("Qwen3Config", "Qwen3ForCausalLM", {}),
    # Windows shorter than a prompt and not a multiple of the block size; the head dim
    # differs from query_pre_attn_scalar so the query scale is really tested.
    "gemma2": TinyArch(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "sliding_window": 24,
            "tie_word_embeddings": True,
            "num_hidden_layers": 3,
            "query_pre_attn_scalar": 24,
        },
    ),  # fmt: skip
    # Gemma 3's shape in small: local layers with their own RoPE base, then a global
    # layer whose RoPE is linearly scaled.
    "gemma3_text": TinyArch(
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "sliding_window": 24,
            "tie_word_embeddings": True,
            "num_hidden_layers": 4,
            "sliding_window_pattern": 3,
            "query_pre_attn_scalar": 24,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        },
    ),  # fmt: skip
}

# Phi-3 ships its projections fused; like Qwen2, its configs carry no head_dim.
ARCHITECTURES["phi3"] = TinyArch("Phi3Config", "Phi3ForCausalLM", {}, head_dim_in_config=False)

# Mixture-of-experts models: four small experts, two per token.
_TINY_EXPERTS: dict[str, Any] = {"num_experts_per_tok": 2, "moe_intermediate_size": 48}
ARCHITECTURES |= {
    "mixtral": TinyArch(
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    ),
    "qwen2_moe": TinyArch(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {"num_experts": 4, "shared_expert_intermediate_size": 96, **_TINY_EXPERTS},
        head_dim_in_config=False,
    ),
    "qwen3_moe": TinyArch(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "norm_topk_prob": True, **_TINY_EXPERTS},
    ),
}

_BASE_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": _MAX_POSITIONS,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def make_tiny_model(
    path: str | os.PathLike[str],
    arch: str = "llama",
    *,
    seed: int = 0,
    chat_style: str = "chatml",
    **config_overrides: Any,
) -> Path:
    """Write a loadable tiny `arch` model folder at `path` and return it as a Path.

    `chat_style` picks the chat template (`CHAT_STYLES`: plain ChatML, or `hermes` /
    `llama3` with function tools, which add their own tokens). `config_overrides`
    replace the config kwargs (e.g. `num_hidden_layers=3`,
    `tie_word_embeddings=True`, `rope_parameters={...}`). A folder already complete
    for the same arguments is returned untouched.

    Raises:
        ValueError: `arch` is not one of `ARCHITECTURES`, or `chat_style` unknown.
    """
    spec = _arch_spec(arch)
    if chat_style not in CHAT_STYLES:
        known = sorted(CHAT_STYLES)
        raise ValueError(f"unknown chat_style {chat_style!r}; expected one of {known}")
    folder = Path(path)
    # The default style leaves the stamp as it was, so existing folders stay valid.
    named = {} if chat_style == "chatml" else {"chat_style": chat_style}
    stamp = _stamp_text(arch, seed, {**config_overrides, **named})
    if _is_complete(folder, stamp):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _STAMP_NAME).unlink(missing_ok=True)
    token_ids = _save_tokenizer(folder, CHAT_STYLES[chat_style])
    config_kwargs = _config_kwargs(spec, token_ids, config_overrides)
    _save_model(folder, spec, seed, config_kwargs)
    # The stamp goes last: a build interrupted before here is redone next time.
    (folder / _STAMP_NAME).write_text(stamp)
    return folder


def default_model_path() -> Path:
    """Return the shared default tiny llama (seed 0), building it on first use.

    It lives in `$PREFIXCACHE_HOME`, else `$XDG_CACHE_HOME/prefixcache`, else
    `~/.cache/prefixcache`, under `tiny-llama/`. It is built in a scratch folder and
    renamed into place, so processes racing to build it never see a partial folder.
    """
    target = cache_home() / "tiny-llama"
    stamp = _stamp_text("llama", 0, {})
    if _is_complete(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=target.parent))
    try:
        make_tiny_model(scratch, "llama", seed=0)
        _install(scratch, target, stamp)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def cache_home() -> Path:
    """Return the folder for prefixcache's cached files (see `default_model_path`)."""
    if home := os.environ.get("PREFIXCACHE_HOME"):
        return Path(home)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "prefixcache"


def _arch_spec(arch: str) -> TinyArch:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown arch {arch!r}; expected one of: {known}") from None


def _stamp_text(arch: str, seed: int, overrides: dict[str, Any]) -> str:
    stamp = {"format": _FORMAT_VERSION, "arch": arch, "seed": seed, "overrides": overrides}
    return json.dumps(stamp, sort_keys=True, default=repr)


def _is_complete(folder: Path, stamp: str) -> bool:
    stamp_file = folder / _STAMP_NAME
    if not stamp_file.is_file() or stamp_file.read_text() != stamp:
        return False
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _install(scratch: Path, target: Path, stamp: str) -> None:
    """Rename `scratch` to `target`, replacing a stale `target` but never a complete one."""
    for _ in range(3):
        try:
            scratch.rename(target)
            return
        except OSError:
            if _is_complete(target, stamp):
                return
            _discard(target)
    raise RuntimeError(f"could not install the tiny model at {target}")


def _discard(folder: Path) -> None:
    aside = folder.with_name(f".{folder.name}-stale-{os.getpid()}-{random.getrandbits(32):x}")
    try:
        folder.rename(aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _config_kwargs(
    spec: TinyArch, token_ids: dict[str, int], overrides: dict[str, Any]
) -> dict[str, Any]:
    kwargs = {**_BASE_CONFIG, **spec.defaults, **token_ids, **overrides}
    if spec.head_dim_in_config:
        kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    return kwargs


def _save_model(folder: Path, spec: TinyArch, seed: int, config_kwargs: dict[str, Any]) -> None:
    import torch
    import transformers

    config = getattr(transformers, spec.config_class)(**config_kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config).to(torch.float32).eval()
    _spread_logits(model)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(folder)


def _spread_logits(model: Any) -> None:
    """Scale the final norm so logits, and the gaps between them, grow by `_LOGIT_SCALE`.

    Logits are linear in the final norm's weight, so this works alike whether or not
    the LM head is tied to the embeddings, and leaves the residual stream unchanged.
    """
    import torch

    with torch.no_grad():
        norm = model.model.norm
        if "Gemma" in type(norm).__name__:  # Gemma scales by 1 + weight
            norm.weight.copy_((1.0 + norm.weight) * _LOGIT_SCALE - 1.0)
        else:
            norm.weight.mul_(_LOGIT_SCALE)
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                param.mul_(_ROUTER_SCALE)


def _save_tokenizer(folder: Path, style: ChatStyle = CHAT_STYLES["chatml"]) -> dict[str, int]:
    """Save the tokenizer to `folder` and return the config's special token ids."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json()),
        bos_token=style.bos if style.bos != ENDOFTEXT else None,
        eos_token=style.eos,
        pad_token=ENDOFTEXT,
        chat_template=style.template,
        model_max_length=_MAX_POSITIONS,
    )
    if style.special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(style.special_tokens)})
    if style.added_tokens:
        tokenizer.add_tokens([AddedToken(t, special=False) for t in style.added_tokens])
    tokenizer.save_pretrained(folder)
    ids = tokenizer.convert_tokens_to_ids
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": ids(style.bos),
        "eos_token_id": ids(style.eos),
        "pad_token_id": ids(ENDOFTEXT),
    }


@functools.cache
def tokenizer_json() -> str:
    """Return the serialized byte-level BPE tokenizer, trained once per process.

    Training sees only `_corpus()`, which is fixed, so the vocabulary is the same in
    every process.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer.to_str()


_ENGLISH = """
The server keeps a cache of every prefix it has seen, so a request that starts the way
an earlier one did can skip most of its work. When the first turn of a chat is done,
the second turn reuses the blocks that hold its tokens, and only the new words are run
through each layer of the model. Memory is shared between requests as long as they
agree, and a block is freed only after the last request that holds it has finished.
People who write long documents, or ask many small questions about one of them, see the
time to the first token drop from seconds to a few milliseconds. This is why the batch
scheduler looks at what is already in the cache before it decides which request to run
next, and why attention over old context must give the same answer as it would have
given if nothing had been cached at all. Could we make it faster? Maybe, but first we
must be sure that it is right: the output should never change, only the time it takes.
"""
_SYLLABLES = "ka lo mi ne ru sa te vo zi pa qu ble tion ing er an or st th ch sh ou ea"
_RARE_TEXT = (
    "café naïve über Grüße façade résumé señor déjà Zürich Ærø Ωmega Привет мир "
    "中文 日本語 你好世界 한국어 🙂 🚀 👍🏽 🎉 € £ ¥ — … “quoted” ½"
)
_COMMON_WORDS = tuple(re.findall(r"[a-z]+", _ENGLISH.lower()))
_RARE_WORDS = tuple(_RARE_TEXT.split())
_PUNCTUATION = (".", ".", ".", "?", "!", ";", ":", "...")


def _corpus(sentences: int = 4000) -> list[str]:
    rng = random.Random(20240607)
    return [_sentence(rng) for _ in range(sentences)]


def _sentence(rng: random.Random) -> str:
    words = [_word(rng) for _ in range(rng.randint(3, 14))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), _number(rng))
    if rng.random() < 0.2:
        words[rng.randrange(len(words))] += ","
    text = " ".join(words)
    text = text[0].upper() + text[1:] + rng.choice(_PUNCTUATION)
    if rng.random() < 0.05:
        text = f'"{text}" ({rng.choice(_COMMON_WORDS)})\n'
    return text


def _word(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.7:
        return rng.choice(_COMMON_WORDS)
    if roll < 0.96:
        return "".join(rng.choices(_SYLLABLES.split(), k=rng.randint(1, 4)))
    return rng.choice(_RARE_WORDS)


def _number(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return str(rng.randint(0, 10 ** rng.randint(1, 6)))
    if kind == 1:
        return f"{rng.uniform(0, 100):.{rng.randint(1, 3)}f}"
    return f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d}"
