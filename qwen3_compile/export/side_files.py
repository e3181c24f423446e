"""The Hugging Face side files a runtime needs next to model.onnx: config, generation config, tokenizer
and chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.tokenizer import ENDOFTEXT_ID, IM_END_ID, tokenizer_dir_for

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)

# Qwen3's published generation defaults (thinking mode); `run` switches to the non-thinking ones
GENERATION_CONFIG = {
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.95,
    "top_k": 20,
    "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
    "pad_token_id": ENDOFTEXT_ID,
    "bos_token_id": ENDOFTEXT_ID,
}


def write_side_files(
    out: Path, arch: Qwen3Arch, max_positions: int, checkpoint_dir: Path | None
) -> list[str]:
    config = arch.to_hf_dict() | {"max_position_embeddings": max_positions}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(GENERATION_CONFIG, indent=2, sort_keys=True) + "\n"
    )
    source = tokenizer_dir_for(checkpoint_dir)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, out / name)
            copied.append(name)
    return copied
