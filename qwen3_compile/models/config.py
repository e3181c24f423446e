"""Qwen3 architecture description: one frozen dataclass read from (and written to) HF `config.json`.

Config spellings differ by writer: transformers 5 writes `num_local_experts` and
`rope_parameters: {rope_theta, rope_type}`; transformers 4.x and the published checkpoints write
`num_experts` and `rope_theta`. We read both and refuse a config where the two disagree, because a
reader that silently falls back to a default (rope_theta 10000) gives wrong logits with no error.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3_compile.errors import BadInputError

DENSE_MODEL_TYPE = "qwen3"
MOE_MODEL_TYPE = "qwen3_moe"
SUPPORTED_ROPE_TYPES = ("default",)


@dataclass(frozen=True)
class Qwen3Arch:
    """Everything about a Qwen3 model's shape that compilation depends on."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float
    tie_word_embeddings: bool
    rms_norm_eps: float = 1e-6
    # dense MLP width; 0 for MoE models
    intermediate_size: int = 0
    # MoE fields; num_experts == 0 means dense
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def model_type(self) -> str:
        return MOE_MODEL_TYPE if self.is_moe else DENSE_MODEL_TYPE

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def with_layers(self, num_layers: int) -> Qwen3Arch:
        """The same architecture with fewer (or more) decoder layers: real width, short depth."""
        if num_layers < 1:
            raise BadInputError(
                f"a model needs at least one layer, got {num_layers}.",
                field="layers",
                fix="pass --layers 1 or more.",
            )
        return dataclasses.replace(self, num_layers=num_layers)

    # ---- HF config.json <-> Qwen3Arch ----------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str | Path = "config.json") -> Qwen3Arch:
        reader = _ConfigReader(cfg, source)
        model_type = reader.require("model_type", str)
        if model_type not in (DENSE_MODEL_TYPE, MOE_MODEL_TYPE):
            raise BadInputError(
                f"model_type '{model_type}' is not a Qwen3 model.",
                file=source,
                field="model_type",
                fix=f"point at a Qwen3 checkpoint (model_type '{DENSE_MODEL_TYPE}' or '{MOE_MODEL_TYPE}').",
            )
        hidden = reader.require("hidden_size", int)
        heads = reader.require("num_attention_heads", int)
        kv_heads = reader.optional("num_key_value_heads", int, heads)
        arch_kwargs: dict[str, Any] = dict(
            vocab_size=reader.require("vocab_size", int),
            hidden_size=hidden,
            num_layers=reader.require("num_hidden_layers", int),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=reader.optional("head_dim", int, hidden // heads),
            max_position_embeddings=reader.require("max_position_embeddings", int),
            rope_theta=reader.rope_theta(),
            tie_word_embeddings=reader.optional("tie_word_embeddings", bool, False),
            rms_norm_eps=reader.optional("rms_norm_eps", float, 1e-6),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )
        if cfg.get("attention_bias"):
            raise BadInputError(
                "Qwen3 has no attention bias, this config sets attention_bias=true.",
                file=source,
                field="attention_bias",
                fix="set it to false; a model with biases is not a Qwen3 model.",
            )
        if cfg.get("use_sliding_window"):
            raise BadInputError(
                "sliding-window attention is not supported.",
                file=source,
                field="use_sliding_window",
                fix="set use_sliding_window to false.",
            )
        if model_type == MOE_MODEL_TYPE:
            arch_kwargs.update(
                num_experts=reader.num_experts(),
                top_k=reader.require("num_experts_per_tok", int),
                moe_intermediate_size=reader.require("moe_intermediate_size", int),
                # the config class defaults to False but every real checkpoint sets True: read it.
                norm_topk_prob=reader.optional("norm_topk_prob", bool, False),
            )
            if cfg.get("mlp_only_layers") or reader.optional("decoder_sparse_step", int, 1) != 1:
                raise BadInputError(
                    "this MoE config mixes dense and sparse layers; every Qwen3 MoE layer is sparse.",
                    file=source,
                    field="mlp_only_layers / decoder_sparse_step",
                    fix="set mlp_only_layers to [] and decoder_sparse_step to 1.",
                )
        else:
            arch_kwargs["intermediate_size"] = reader.require("intermediate_size", int)
        arch = cls(**arch_kwargs)
        arch.check(source)
        return arch

    @classmethod
    def from_config_file(cls, path: str | Path) -> Qwen3Arch:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise BadInputError(
                "config.json is missing.",
                file=path,
                fix="a Hugging Face checkpoint directory needs its config.json "
                "(save the model with save_pretrained).",
            ) from None
        except OSError as err:
            raise BadInputError(
                f"cannot read the file ({err.strerror}).",
                file=path,
                fix="check the path and its permissions.",
            ) from None
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadInputError(
                f"config.json is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}).",
                file=path,
                fix="repair or re-save the file.",
            ) from None
        if not isinstance(cfg, dict):
            raise BadInputError(
                "config.json must hold a JSON object.",
                file=path,
                fix="re-save the config with save_pretrained.",
            )
        return cls.from_hf_dict(cfg, path)

    def check(self, source: str | Path = "config") -> None:
        """Internal consistency of the numbers; named errors rather than a crash inside torch."""
        positive = [
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ]
        positive += (
            ["num_experts", "top_k", "moe_intermediate_size"] if self.is_moe else ["intermediate_size"]
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise BadInputError(
                    f"{name} must be positive, got {getattr(self, name)}.",
                    file=source,
                    field=name,
                    fix="correct the value in config.json.",
                )
        if self.num_heads % self.num_kv_heads:
            raise BadInputError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of num_key_value_heads "
                f"({self.num_kv_heads}).",
                file=source,
                field="num_key_value_heads",
                fix="grouped-query attention needs heads to divide evenly into key/value groups.",
            )
        if self.head_dim % 2:
            raise BadInputError(
                f"head_dim must be even for rotary embeddings, got {self.head_dim}.",
                file=source,
                field="head_dim",
                fix="correct head_dim in config.json.",
            )
        if self.is_moe and self.top_k > self.num_experts:
            raise BadInputError(
                f"num_experts_per_tok ({self.top_k}) exceeds the number of experts ({self.num_experts}).",
                file=source,
                field="num_experts_per_tok",
                fix="correct the value in config.json.",
            )
        if self.rope_theta <= 0:
            raise BadInputError(
                f"rope_theta must be positive, got {self.rope_theta}.",
                file=source,
                field="rope_theta",
                fix="correct the value in config.json.",
            )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that both transformers 4.x and 5.x read correctly (both spellings written)."""
        cfg: dict[str, Any] = {
            "architectures": ["Qwen3MoeForCausalLM" if self.is_moe else "Qwen3ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "use_sliding_window": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.is_moe:
            cfg.update(
                num_experts=self.num_experts,
                num_local_experts=self.num_experts,
                num_experts_per_tok=self.top_k,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        else:
            cfg["intermediate_size"] = self.intermediate_size
        return cfg

    def to_transformers_config(self):
        """The transformers config object for the reference model (lazy import)."""
        from transformers import Qwen3Config, Qwen3MoeConfig

        cfg = self.to_hf_dict()
        cfg.pop("architectures")
        cfg.pop("model_type")
        cls = Qwen3MoeConfig if self.is_moe else Qwen3Config
        config = cls(**cfg)
        # fail loudly if transformers would read a different rope base than ours
        rope = getattr(config, "rope_parameters", None) or {}
        seen = rope.get("rope_theta", getattr(config, "rope_theta", None))
        if seen is None or float(seen) != float(self.rope_theta):
            raise RuntimeError(f"transformers read rope_theta={seen}, expected {self.rope_theta}")
        return config


class _ConfigReader:
    """Typed access to config.json fields with errors that name the field."""

    def __init__(self, cfg: dict[str, Any], source: str | Path):
        self.cfg = cfg
        self.source = source

    def _typed(self, key: str, value: Any, kind: type) -> Any:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise BadInputError(
                f"expected {kind.__name__}, got {value!r}.",
                file=self.source,
                field=key,
                fix=f"write '{key}' as a JSON {'number' if kind in (int, float) else kind.__name__}.",
            )
        return value

    def require(self, key: str, kind: type) -> Any:
        if key not in self.cfg or self.cfg[key] is None:
            raise BadInputError(
                "a required field is missing.",
                file=self.source,
                field=key,
                fix=f"add '{key}' to config.json (the published Qwen3 configs have it).",
            )
        return self._typed(key, self.cfg[key], kind)

    def optional(self, key: str, kind: type, default: Any) -> Any:
        value = self.cfg.get(key)
        return default if value is None else self._typed(key, value, kind)

    def rope_theta(self) -> float:
        flat = self.cfg.get("rope_theta")
        params = self.cfg.get("rope_parameters") or self.cfg.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise BadInputError(
                "expected an object.",
                file=self.source,
                field="rope_parameters",
                fix='write rope_parameters as {"rope_theta": ..., "rope_type": "default"}.',
            )
        nested = params.get("rope_theta")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise BadInputError(
                f"rope_type '{rope_type}' is not supported yet (only {', '.join(SUPPORTED_ROPE_TYPES)}).",
                file=self.source,
                field="rope_parameters.rope_type",
                fix="remove the rope scaling block; Qwen3 2507 models reach 262144 positions without it.",
            )
        if flat is None and nested is None:
            raise BadInputError(
                "no rope_theta found (neither 'rope_theta' nor 'rope_parameters.rope_theta').",
                file=self.source,
                field="rope_theta",
                fix='add "rope_theta": 1000000 (Qwen3) or the value the model was trained with; '
                "a silent default of 10000 would give wrong logits.",
            )
        if flat is not None and nested is not None and float(flat) != float(nested):
            raise BadInputError(
                f"rope_theta ({flat}) and rope_parameters.rope_theta ({nested}) disagree.",
                file=self.source,
                field="rope_theta",
                fix="make both the model's trained value.",
            )
        value = flat if flat is not None else nested
        return self._typed("rope_theta", value, float)

    def num_experts(self) -> int:
        a = self.cfg.get("num_experts")
        b = self.cfg.get("num_local_experts")
        if a is None and b is None:
            raise BadInputError(
                "an MoE config needs the number of experts.",
                file=self.source,
                field="num_experts",
                fix='add "num_experts" (128 for Qwen3-30B-A3B).',
            )
        if a is not None and b is not None and a != b:
            raise BadInputError(
                f"num_experts ({a}) and num_local_experts ({b}) disagree.",
                file=self.source,
                field="num_experts",
                fix="make both the same value.",
            )
        key = "num_experts" if a is not None else "num_local_experts"
        return self._typed(key, a if a is not None else b, int)
