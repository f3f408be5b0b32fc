"""The typed configuration tree rejects values outside its choices with a message naming the field."""

from __future__ import annotations

import pytest

from accordion.cluster.config import DeviceConfig


@pytest.mark.parametrize("field,value", [("device", "tpu"), ("attention_backend", "flash"),
                                         ("hybrid_attention", "always"), ("cuda_graph_max_batch", 0)])
def test_device_config_rejects_unknown_values(field, value):
    with pytest.raises(ValueError, match=field):
        DeviceConfig(**{field: value})


def test_device_config_defaults_choose_hybrid_attention_per_step():
    cfg = DeviceConfig()
    assert (cfg.attention_backend, cfg.hybrid_attention) == ("auto", "auto")


def test_serve_flags_reach_the_device_config(tmp_path):
    import argparse

    from accordion.serve import add_serve_args, engine_config_from_args

    (tmp_path / "config.json").write_text("{}")  # a model directory (not loaded here)
    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["--model", str(tmp_path), "--device", "cpu", "--attention-backend", "triton",
                         "--hybrid-attention", "fused"])
    cfg = engine_config_from_args(args).device
    assert (cfg.device, cfg.attention_backend, cfg.hybrid_attention) == ("cpu", "triton", "fused")
