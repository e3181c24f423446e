"""Qwen3 architecture description: one frozen dataclass read from (and written to) HF `config.json`.

Config spellings differ by writer: transformers 5 writes `num_local_experts` and
`rope_parameters: {rope_theta, rope_type}`; transformers 4.x and the published checkpoints write
`num_experts` and `rope_theta`. We read both and refuse a config where the two disagree, because a
reader that silently falls back to a default (rope_theta 10000) gives wrong logits with no error.

`HFConfig` is config.json as we read it: every key we use, typed and ranged through the strict decoder
(a bool is not a number, no NaN, positive sizes, eps in (0, 1), bounded so that a config cannot make us
enumerate billions of tensors); `Qwen3Arch.check` then holds the fields to each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qwen3_compile.errors import BadInputError
from qwen3_compile.models.quantized.config import parse_quantization_config
from qwen3_compile.schema import decode
from qwen3_compile.storage.user_files import MAX_CONFIG_BYTES, read_json_object

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
        model_type = cfg.get("model_type")
        if model_type not in (DENSE_MODEL_TYPE, MOE_MODEL_TYPE):
            raise BadInputError(
                f"model_type {model_type!r} is not a Qwen3 model.",
                file=source,
                field="model_type",
                fix=f"point at a Qwen3 checkpoint (model_type '{DENSE_MODEL_TYPE}' or '{MOE_MODEL_TYPE}').",
            )
        _check_rope_type(cfg, source)
        parse_quantization_config(cfg, source)  # a quantized checkpoint's format must be one we import
        arch = cls(**decode(HFConfig, _our_keys(cfg), file=source).arch_fields(source))
        arch._check_consistency(source)
        return arch

    @classmethod
    def from_config_file(cls, path: str | Path) -> Qwen3Arch:
        path = Path(path)
        cfg = read_json_object(
            path,
            MAX_CONFIG_BYTES,
            missing_fix="a Hugging Face checkpoint directory needs its config.json "
            "(save the model with save_pretrained).",
            fix="repair the file or re-save the config with save_pretrained.",
        )
        return cls.from_hf_dict(cfg, path)

    def check(self, source: str | Path = "config") -> None:
        """Every field typed and in range (as config.json would say it), then consistent with the others."""
        decode(HFConfig, _our_keys(self.to_hf_dict()), file=source)
        self._check_consistency(source)

    def _check_consistency(self, source: str | Path) -> None:
        """The fields against each other: named errors rather than a crash inside torch."""

        def refuse(key: str, problem: str, fix: str = "correct the value in config.json.") -> None:
            raise BadInputError(problem, file=source, field=key, fix=fix)

        if self.num_heads % self.num_kv_heads:
            refuse(
                "num_key_value_heads",
                f"num_attention_heads ({self.num_heads}) is not a multiple of num_key_value_heads "
                f"({self.num_kv_heads}).",
                "grouped-query attention needs heads to divide evenly into key/value groups.",
            )
        if self.head_dim < 2 or self.head_dim % 2:
            refuse("head_dim", f"head_dim must be even for rotary embeddings, got {self.head_dim}.")
        if self.is_moe and self.top_k > self.num_experts:
            refuse(
                "num_experts_per_tok",
                f"num_experts_per_tok ({self.top_k}) exceeds the number of experts ({self.num_experts}).",
            )
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        if not eos:
            refuse("eos_token_id", "an empty list of end-of-sequence ids.", "give the eos id, e.g. 151645.")
        for name, ids in (("bos_token_id", [self.bos_token_id]), ("eos_token_id", eos)):
            bad = [i for i in ids if i is not None and not 0 <= i < self.vocab_size]
            if bad:
                refuse(name, f"token id {bad[0]} is outside the vocabulary (0 to {self.vocab_size - 1}).")

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


def _sizes(high: int, low: int = 1, default: Any = dataclasses.MISSING) -> Any:
    return field(default=default, metadata={"min": low, "max": high})


# bounds: far above every release (Qwen3-235B: 94 layers, 128 experts, hidden 4096), low enough that a
# hostile config cannot make us enumerate billions of tensor names or overflow a shape
_LAYERS, _HEADS, _WIDTH, _EXPERTS = 512, 1024, 1 << 20, 1024


@dataclass(frozen=True)
class RopeParameters:
    """`rope_parameters` (transformers 5) or `rope_scaling` (4.x): only plain RoPE is supported."""

    rope_theta: float | None = field(default=None, metadata={"above": 0, "max": 1e12})
    rope_type: Literal["default"] | None = None
    type: Literal["default"] | None = None  # the 4.x spelling of rope_type


@dataclass(frozen=True)
class HFConfig:
    """The keys of config.json that we read, typed and ranged; `None` is "not set"."""

    model_type: Literal["qwen3", "qwen3_moe"]
    vocab_size: int = _sizes(1 << 22)
    hidden_size: int = _sizes(1 << 16)
    num_hidden_layers: int = _sizes(_LAYERS)
    num_attention_heads: int = _sizes(_HEADS)
    max_position_embeddings: int = _sizes(1 << 24)
    num_key_value_heads: int | None = _sizes(_HEADS, default=None)
    head_dim: int | None = _sizes(1024, low=2, default=None)
    intermediate_size: int | None = _sizes(_WIDTH, default=None)
    rope_theta: float | None = field(default=None, metadata={"above": 0, "max": 1e12})
    rope_parameters: RopeParameters | None = None
    rope_scaling: RopeParameters | None = None
    rms_norm_eps: float = field(default=1e-6, metadata={"above": 0, "below": 1})
    tie_word_embeddings: bool = False
    hidden_act: Literal["silu"] = "silu"
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = _sizes(1 << 24, low=0, default=None)
    max_window_layers: int | None = _sizes(1 << 16, low=0, default=None)
    layer_types: list[Literal["full_attention"]] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # MoE
    num_experts: int | None = _sizes(_EXPERTS, default=None)
    num_local_experts: int | None = _sizes(_EXPERTS, default=None)
    num_experts_per_tok: int | None = _sizes(_EXPERTS, default=None)
    moe_intermediate_size: int | None = _sizes(_WIDTH, default=None)
    norm_topk_prob: bool = False  # the config class's default; every real checkpoint sets True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    def arch_fields(self, source: str | Path) -> dict[str, Any]:
        """Qwen3Arch's fields: required keys per model type, the two spellings reconciled."""

        def refuse(key: str, problem: str, fix: str) -> BadInputError:
            return BadInputError(problem, file=source, field=key, fix=fix)

        def need(key: str) -> Any:
            value = getattr(self, key)
            if value is None:
                raise refuse(
                    key,
                    "a required field is missing.",
                    f"add '{key}' to config.json (the published Qwen3 configs have it).",
                )
            return value

        if self.attention_bias:
            raise refuse(
                "attention_bias",
                "Qwen3 has no attention bias, this config sets attention_bias=true.",
                "set it to false; a model with biases is not a Qwen3 model.",
            )
        if self.use_sliding_window:
            raise refuse(
                "use_sliding_window",
                "sliding-window attention is not supported.",
                "set use_sliding_window to false.",
            )
        heads = self.num_attention_heads
        arch: dict[str, Any] = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=self.num_key_value_heads or heads,
            head_dim=self.head_dim or self.hidden_size // heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self._rope_theta(refuse),
            tie_word_embeddings=self.tie_word_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        if self.model_type == DENSE_MODEL_TYPE:
            return arch | {"intermediate_size": need("intermediate_size")}
        experts = {k: v for k in ("num_experts", "num_local_experts") if (v := getattr(self, k)) is not None}
        if not experts:
            raise refuse(
                "num_experts",
                "an MoE config needs the number of experts.",
                'add "num_experts" (128 for Qwen3-30B-A3B).',
            )
        if len(set(experts.values())) > 1:
            raise refuse(
                "num_experts",
                f"num_experts ({self.num_experts}) and num_local_experts ({self.num_local_experts}) "
                "disagree.",
                "make both the same value.",
            )
        if self.mlp_only_layers or self.decoder_sparse_step != 1:
            raise refuse(
                "mlp_only_layers / decoder_sparse_step",
                "this MoE config mixes dense and sparse layers; every Qwen3 MoE layer is sparse.",
                "set mlp_only_layers to [] and decoder_sparse_step to 1.",
            )
        return arch | dict(
            num_experts=next(iter(experts.values())),
            top_k=need("num_experts_per_tok"),
            moe_intermediate_size=need("moe_intermediate_size"),
            norm_topk_prob=self.norm_topk_prob,
        )

    def _rope_theta(self, refuse) -> float:
        """One base from the flat and nested spellings; none is an error, not a silent 10000."""
        found = {"rope_theta": self.rope_theta}
        for key in ("rope_parameters", "rope_scaling"):
            params = getattr(self, key)
            found[f"{key}.rope_theta"] = params.rope_theta if params is not None else None
        found = {k: v for k, v in found.items() if v is not None}
        if not found:
            raise refuse(
                "rope_theta",
                "no rope_theta found (neither 'rope_theta' nor 'rope_parameters.rope_theta').",
                'add "rope_theta": 1000000 (Qwen3) or the value the model was trained with; '
                "a silent default of 10000 would give wrong logits.",
            )
        if len(set(found.values())) > 1:
            said = " and ".join(f"{k} ({v})" for k, v in found.items())
            raise refuse("rope_theta", f"{said} disagree.", "make both the model's trained value.")
        return next(iter(found.values()))


_HF_KEYS = {f.name for f in dataclasses.fields(HFConfig)}


def _our_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """The keys HFConfig reads; the others are left alone, and null is what writers put for "not set"."""
    return {k: v for k, v in cfg.items() if k in _HF_KEYS and v is not None}


def _check_rope_type(cfg: dict[str, Any], source: str | Path) -> None:
    """Before decoding, so a scaled RoPE gets this message rather than 'unknown key factor'."""
    for key in ("rope_parameters", "rope_scaling"):
        params = cfg.get(key)
        if not isinstance(params, dict):
            continue
        rope_type = params.get("rope_type") or params.get("type") or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise BadInputError(
                f"rope_type {rope_type!r} is not supported yet (only {', '.join(SUPPORTED_ROPE_TYPES)}).",
                file=source,
                field=f"{key}.rope_type",
                fix="remove the rope scaling block; Qwen3 2507 models reach 262144 positions without it.",
            )
