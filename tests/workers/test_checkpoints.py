"""Random-weight checkpoints (accordion.checkpoints) load in transformers and behave like real models."""

from __future__ import annotations

import json

import pytest
import torch

from accordion.checkpoints import PRESETS, build_config, make_checkpoint, weight_bytes, weight_shapes

transformers = pytest.importorskip("transformers")

TINY = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"]


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {p: make_checkpoint(root / p, p) for p in TINY}


@pytest.mark.parametrize("preset", TINY)
def test_tiny_loads_runs_and_generates(tiny_ckpts, preset):
    path = tiny_ckpts[preset]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == build_config(preset)["architectures"][0]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert torch.isfinite(logits).all() and logits.std() > 0.3  # not flat
    out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert len(new) == 8 and len(set(new)) > 1


def test_config_fields(tiny_ckpts):
    cfg = transformers.AutoConfig.from_pretrained(tiny_ckpts["tiny-llama"])
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["factor"] == 8.0
    assert cfg.rope_parameters["original_max_position_embeddings"] == 256
    assert cfg.rope_parameters["rope_theta"] == 500000.0 and not cfg.tie_word_embeddings
    raw = json.loads((tiny_ckpts["tiny-llama"] / "config.json").read_text())
    assert raw["rope_theta"] == 500000.0 and raw["rope_scaling"]["rope_type"] == "llama3"  # legacy keys kept
    mistral = transformers.AutoConfig.from_pretrained(tiny_ckpts["tiny-mistral"])
    assert mistral.sliding_window is None and mistral.rope_parameters["rope_theta"] == 10000.0
    qwen3 = transformers.AutoConfig.from_pretrained(tiny_ckpts["tiny-qwen3"])
    assert qwen3.head_dim == 32 and qwen3.tie_word_embeddings and not qwen3.attention_bias
    shapes = weight_shapes(build_config("tiny-qwen2"))
    assert "model.layers.0.self_attn.q_proj.bias" in shapes and "model.layers.0.self_attn.o_proj.bias" not in shapes
    assert "lm_head.weight" not in shapes
    assert "model.layers.1.self_attn.k_norm.weight" in weight_shapes(build_config("tiny-qwen3"))


def test_real_shapes_param_counts():
    n = {p: sum(torch.Size(s).numel() for s in weight_shapes(build_config(p)).values())
         for p in ("llama-3.2-1b", "llama-3.1-8b")}
    assert n["llama-3.2-1b"] == 1_235_814_400 and n["llama-3.1-8b"] == 8_030_261_248
    assert set(PRESETS) >= {"tiny-llama", "llama-3.1-8b"}


def test_tokenizer_round_trip_and_chat_template(tiny_ckpts):
    path = tiny_ckpts["tiny-qwen3"]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    text = "Héllo wörld! Ünïcode → 漢字 and  double  spaces\n\tend."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 0
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) <= build_config("tiny-qwen3")["vocab_size"]
    assert (tok.eos_token, tok.pad_token) == ("</s>", "<pad>")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    gen = json.loads((path / "generation_config.json").read_text())
    assert tok.convert_ids_to_tokens(gen["eos_token_id"]) == ["</s>", "<|im_end|>"]


def test_sharded_save_matches_single_file(tmp_path):
    one = make_checkpoint(tmp_path / "one", "tiny-llama", seed=3)
    many = make_checkpoint(tmp_path / "many", "tiny-llama", seed=3, max_shard_bytes=40_000)
    files = sorted(p.name for p in many.glob("model-*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == weight_bytes(many) == weight_bytes(one)
    a = transformers.AutoModelForCausalLM.from_pretrained(one).state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(many).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A rerun into the same directory with one file leaves no stale shards behind.
    make_checkpoint(many, "tiny-llama", seed=3)
    assert not list(many.glob("model-*.safetensors")) and not (many / "model.safetensors.index.json").exists()


def test_bf16_and_overrides(tmp_path):
    path = make_checkpoint(tmp_path / "c", "tiny-mistral", dtype="bfloat16", num_hidden_layers=3, init_std=0.1)
    cfg = transformers.AutoConfig.from_pretrained(path)
    assert cfg.num_hidden_layers == 3 and cfg.dtype == torch.bfloat16
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    w = model.model.layers[2].mlp.up_proj.weight.float()
    assert abs(w.std().item() - 0.1) < 0.01
