"""Random-weight Hugging Face checkpoints of real or tiny model shapes, for tests and benchmarks.

``make_checkpoint(path, "tiny-llama")`` writes a directory that both
``transformers.AutoModelForCausalLM.from_pretrained`` and accordion's loader read: ``config.json``,
``generation_config.json``, ``model.safetensors`` (or shards plus ``model.safetensors.index.json``),
``tokenizer.json`` and ``tokenizer_config.json`` (with a ChatML chat template).
Nothing is downloaded: the tokenizer is a byte-level BPE trained in well under a second on a little text, and the
weights are seeded Gaussian noise, scaled so that logits are far from flat and greedy tokens vary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

_LLAMA3_8K = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=128, vocab_size=512, max_position_embeddings=2048, init_std=0.15)

PRESETS: dict[str, dict] = {
    "tiny-llama": dict(_TINY, family="llama", rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
    "tiny-mistral": dict(_TINY, family="mistral", rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "tiny-qwen2": dict(_TINY, family="qwen2", rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "tiny-qwen3": dict(_TINY, family="qwen3", head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True,
                       rms_norm_eps=1e-6),
    "llama-3.2-1b": dict(family="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, rope_scaling=dict(_LLAMA3_8K, factor=32.0), init_std=0.02),
    "llama-3.1-8b": dict(family="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
                         rms_norm_eps=1e-5, rope_scaling=dict(_LLAMA3_8K, factor=8.0), init_std=0.02),
}
"""Preset name -> architecture fields (HF config names) plus ``family`` and the default ``init_std``."""

_FAMILIES = {  # family -> (architecture, model_type, fields specific to the family)
    "llama": ("LlamaForCausalLM", "llama", {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}),
    "mistral": ("MistralForCausalLM", "mistral", {"sliding_window": None}),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", {"use_sliding_window": False, "sliding_window": None}),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", {"attention_bias": False, "use_sliding_window": False,
                                            "sliding_window": None}),
}
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
"""Special tokens, at ids 0..4 of every generated tokenizer: bos, eos, pad, ChatML start and end."""
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_config(preset: str, dtype: str = "float32", **overrides) -> dict:
    """The ``config.json`` dict of ``preset`` with ``overrides`` (HF field names) applied.

    RoPE settings are written both the transformers 5.x way (``rope_parameters``) and the legacy way
    (``rope_theta`` + ``rope_scaling``), kept consistent, so old and new transformers and our loader agree.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    spec = {k: v for k, v in PRESETS[preset].items() if k != "init_std"}
    spec.update(overrides)
    arch, model_type, extra = _FAMILIES[spec.pop("family")]
    cfg = {"architectures": [arch], "model_type": model_type, "hidden_act": "silu", "attention_dropout": 0.0,
           "initializer_range": 0.02, "use_cache": True, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    cfg.update(extra)
    cfg.update(spec)
    scaling = cfg.get("rope_scaling")
    cfg["rope_scaling"] = dict(scaling) if scaling else None
    cfg["rope_parameters"] = dict(scaling or {"rope_type": "default"}, rope_theta=float(cfg["rope_theta"]))
    if model_type in ("qwen2", "qwen3"):  # no sliding window anywhere: every layer is full attention
        cfg.setdefault("max_window_layers", cfg["num_hidden_layers"])
        cfg.setdefault("layer_types", ["full_attention"] * cfg["num_hidden_layers"])
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    # transformers >= 5 reads a missing or pre-5 version as "maybe a broken Mistral tokenizer" and warns on load.
    cfg["transformers_version"] = _transformers_version()
    return dict(sorted(cfg.items()))


def _transformers_version() -> str:
    """The installed transformers version if it is 5.x or later, else ``"5.0.0"`` (the format these configs use)."""
    try:
        import transformers

        return transformers.__version__ if int(transformers.__version__.split(".")[0]) >= 5 else "5.0.0"
    except Exception:  # not installed or an odd version string
        return "5.0.0"


def weight_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, in HF naming and order, for a config made by :func:`build_config`."""
    h, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    qkv_bias = cfg["model_type"] == "qwen2" or bool(cfg.get("attention_bias"))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for name, rows in (("q", q), ("k", kv), ("v", kv)):
            shapes[f"{p}self_attn.{name}_proj.weight"] = (rows, h)
            if qkv_bias:
                shapes[f"{p}self_attn.{name}_proj.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if cfg.get("attention_bias"):
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg["model_type"] == "qwen3":
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, std: float, seed: int,
                   device: str) -> torch.Tensor:
    """Seeded noise for one tensor: norms are ``1 + 0.05 * N(0, 1)``, everything else ``std * N(0, 1)``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    t = torch.randn(shape, generator=gen, dtype=dtype, device=device)
    if name.endswith("norm.weight"):
        return t.mul_(0.05).add_(1.0)
    return t.mul_(std)


def _corpus_text(corpus: str | Path | None, max_chars: int = 200_000) -> str:
    """Training text for the tokenizer: a file, else wikitext-2 if present, else stdlib docstrings (always there)."""
    default = Path("/work/shared/data/text/wikitext-2-raw-test.txt")
    path = Path(corpus) if corpus is not None else (default if default.is_file() else None)
    if path is not None:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(max_chars)
    import argparse, collections, json as json_mod, logging, subprocess, typing  # noqa: E401
    docs = []
    for mod in (argparse, collections, json_mod, logging, subprocess, typing, random):
        docs += [getattr(mod, n).__doc__ or "" for n in sorted(dir(mod)) if not n.startswith("_")] + [mod.__doc__]
    return "\n".join(d for d in docs if isinstance(d, str))[:max_chars]


def build_tokenizer(vocab_size: int, *, corpus: str | Path | None = None, pad_to_vocab: bool = True,
                    max_trained: int = 8192):
    """A byte-level BPE ``tokenizers.Tokenizer`` with :data:`SPECIAL_TOKENS` at ids 0..4 and a ``<s>`` prefix.

    At most ``max_trained`` entries are learned from the corpus; with ``pad_to_vocab`` the vocabulary is then filled
    with unreachable ``<|reserved_N|>`` entries up to ``vocab_size``, so every id a random model emits decodes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    text = _corpus_text(corpus)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, max_trained), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((text[i:i + 4096] for i in range(0, len(text), 4096)), trainer)
    if len(SPECIAL_TOKENS) + 256 > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer")
    if pad_to_vocab and tok.get_vocab_size() < vocab_size:
        model = json.loads(tok.to_str())["model"]
        vocab, merges = model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))
                                         for m in model["merges"]]
        vocab.update({f"<|reserved_{i}|>": i for i in range(len(vocab), vocab_size)})
        tok.model = models.BPE(vocab, merges)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 0)]),
    ])
    return tok


def _write_tokenizer(path: Path, cfg: dict, corpus: str | Path | None) -> None:
    tok = build_tokenizer(cfg["vocab_size"], corpus=corpus)
    tok.save(str(path / "tokenizer.json"))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
               "pad_token": "<pad>", "unk_token": None, "add_bos_token": True, "add_eos_token": False,
               "clean_up_tokenization_spaces": False, "model_max_length": cfg["max_position_embeddings"],
               "padding_side": "left", "chat_template": CHAT_TEMPLATE,
               "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    """Split tensor names, in order, into groups of at most ``max_shard_bytes`` (a bigger tensor stands alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def make_checkpoint(path: str | Path, preset: str, *, dtype: str = "float32", seed: int = 0,
                    init_std: float | None = None, max_shard_bytes: int = 2 << 30, device: str = "cpu",
                    corpus: str | Path | None = None, **config_overrides) -> Path:
    """Write a random-weight HF checkpoint of ``preset`` (see :data:`PRESETS`) into ``path``; return ``path``.

    Args:
        path: output directory (created if missing; existing files of the same names are overwritten).
        preset: a key of :data:`PRESETS`, e.g. ``"tiny-llama"`` or ``"llama-3.1-8b"``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: the stored dtype; weights are generated in it directly.
        seed: base seed; tensor ``i`` uses ``seed * 1_000_003 + i``, so shards do not change the weights.
        init_std: std of the Gaussian weights; default per preset (0.15 for tiny shapes, 0.02 for real ones).
        max_shard_bytes: above this many bytes the weights go into ``model-0000K-of-0000N.safetensors`` files.
        device: where the noise is drawn (``"cuda"`` is far faster for 8B shapes; CPU and CUDA draws differ).
        corpus: text file to train the tokenizer on (default: wikitext-2 if present, else stdlib docstrings).
        **config_overrides: HF config fields replacing the preset's (e.g. ``num_hidden_layers=4``).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").unlink(missing_ok=True)
    cfg = build_config(preset, dtype=dtype, **config_overrides)
    std = PRESETS[preset]["init_std"] if init_std is None else init_std
    torch_dtype = _DTYPES[dtype]
    gen_cfg = {"bos_token_id": 0, "eos_token_id": [1, 4], "pad_token_id": 2, "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    _write_tokenizer(path, cfg, corpus)

    shapes = weight_shapes(cfg)
    index = {name: i for i, name in enumerate(shapes)}
    shards = _plan_shards(shapes, torch_dtype.itemsize, max_shard_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()  # a rerun with a different shard count must not leave stale files
    weight_map, total = {}, 0
    for names, fname in zip(shards, files):
        tensors = {}
        for n in names:
            t = _random_tensor(n, shapes[n], torch_dtype, std, seed * 1_000_003 + index[n], device)
            tensors[n] = t.cpu().contiguous()
            total += tensors[n].numel() * tensors[n].element_size()
            weight_map[n] = fname
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        del tensors
    if len(files) > 1:
        idx = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")  # last: its presence marks a complete write
    return path


def weight_bytes(path: str | Path) -> int:
    """Total bytes of the tensors stored in the checkpoint at ``path`` (the safetensors payload, headers excluded)."""
    from safetensors import safe_open

    itemsize = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                total += int(torch.Size(sl.get_shape()).numel()) * itemsize[sl.get_dtype()]
    return total
