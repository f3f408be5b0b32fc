"""Load HF safetensors checkpoints into :class:`LlamaForCausalLM`. Never unpickles anything.

HF tensors map onto accordion's fused parameters: q/k/v projections stack into ``qkv`` (rows in q, k, v order)
and gate/up into ``mlp.gate_up``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from accordion.workers.arch import ArchConfig
from accordion.workers.layers import RotaryEmbedding
from accordion.workers.models.llama import LlamaForCausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path} (pickle checkpoints are not loaded, by design)")
    return files


def _target(arch: ArchConfig, model: LlamaForCausalLM, name: str) -> tuple[torch.Tensor, slice | None] | None:
    """The parameter (and row slice of it) that checkpoint tensor ``name`` fills; None to skip it."""
    if name == "model.embed_tokens.weight":
        return model.embed_tokens.weight, None
    if name == "model.norm.weight":
        return model.norm.weight, None
    if name == "lm_head.weight":
        return (None if model.lm_head is None else (model.lm_head.weight, None))
    m = _LAYER.match(name)
    if m is None:
        return None
    layer = model.layers[int(m.group(1))]
    rest = m.group(2)
    q, kv = arch.q_size, arch.kv_size
    fused = {
        "self_attn.q_proj": (layer.self_attn.qkv, slice(0, q)),
        "self_attn.k_proj": (layer.self_attn.qkv, slice(q, q + kv)),
        "self_attn.v_proj": (layer.self_attn.qkv, slice(q + kv, q + 2 * kv)),
        "mlp.gate_proj": (layer.mlp.gate_up, slice(0, arch.intermediate_size)),
        "mlp.up_proj": (layer.mlp.gate_up, slice(arch.intermediate_size, 2 * arch.intermediate_size)),
    }
    module_name, _, kind = rest.rpartition(".")
    if module_name in fused:
        module, rows = fused[module_name]
        param = getattr(module, kind, None)
        return (param, rows) if param is not None else None
    plain = {
        "self_attn.o_proj": layer.self_attn.o_proj,
        "mlp.down_proj": layer.mlp.down,
        "input_layernorm": layer.input_layernorm,
        "post_attention_layernorm": layer.post_attention_layernorm,
        "self_attn.q_norm": getattr(layer.self_attn, "q_norm", None),
        "self_attn.k_norm": getattr(layer.self_attn, "k_norm", None),
    }
    module = plain.get(module_name)
    param = getattr(module, kind, None) if module is not None else None
    return (param, None) if param is not None else None


def load_model(
    path: str | Path, arch: ArchConfig, *, dtype: torch.dtype, device: torch.device, max_positions: int
) -> LlamaForCausalLM:
    path = Path(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, max_positions)
    model = model.to_empty(device=device).to(dtype)
    # cos/sin tables stay fp32 (cast per use, as HF does); meta buffers hold no values, so build them now.
    model.rotary = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling).to(device)
    filled: set[int] = set()
    expected = {id(p) for p in model.parameters()}
    slices_seen: dict[int, int] = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                target = _target(arch, model, name)
                if target is None:
                    continue
                param, rows = target
                tensor = st.get_tensor(name)
                dst = param.data if rows is None else param.data[rows]
                if dst.shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(dst.shape)}")
                dst.copy_(tensor.to(device=device, dtype=dtype))
                if rows is None:
                    filled.add(id(param))
                else:
                    slices_seen[id(param)] = slices_seen.get(id(param), 0) + (rows.stop - rows.start)
                    if slices_seen[id(param)] == param.shape[0]:
                        filled.add(id(param))
    missing = [n for n, p in model.named_parameters() if id(p) in expected - filled]
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors for: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return model.eval()
