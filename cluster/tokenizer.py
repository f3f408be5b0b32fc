"""Tokenization on the way in; incremental detokenization on the way out.

Wraps the checkpoint's ``tokenizer.json`` through HF ``transformers`` (chat templates, special tokens) and uses
``tokenizers``' ``DecodeStream`` for streaming text that never splits a multi-byte character.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers.decoders import DecodeStream


class Tokenizer:
    """The model's tokenizer. Cheap to share; not thread-safe for ``DecodeStream`` objects (one per request)."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer  # heavy import: only where a tokenizer is needed

        self.path = Path(path)
        self.hf = AutoTokenizer.from_pretrained(str(self.path))
        self._backend = self.hf.backend_tokenizer
        self.eos_token_ids = self._eos_ids()
        self.bos_token_id: int | None = self.hf.bos_token_id
        self.vocab_size = len(self.hf)

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        if self.hf.eos_token_id is not None:
            ids.append(int(self.hf.eos_token_id))
        gen_cfg = self.path / "generation_config.json"
        if gen_cfg.exists():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            for e in [eos] if isinstance(eos, int) else (eos or []):
                if e not in ids:
                    ids.append(int(e))
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        if not self.hf.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        out = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)

    def decode_stream(self, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_token_ids, skip_special_tokens)


class IncrementalDetokenizer:
    """Text deltas for a growing token sequence; multi-byte characters are held back until complete."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool):
        self._tok = tokenizer
        try:
            # Priming with the prompt's tail gives the right leading space / merge context.
            self._stream = DecodeStream(ids=prompt_token_ids[-4:], skip_special_tokens=skip_special_tokens)
        except TypeError:  # tokenizers < 0.22 has no prefill ids
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        piece = self._stream.step(self._tok._backend, token_id)
        return piece or ""
