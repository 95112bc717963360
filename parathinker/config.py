"""Frozen configuration: the decoder's shape (from config.json) and the sampling parameters."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
DEFAULT_MAX_SEGMENTS = 32


@dataclass(frozen=True)
class ModelConfig:
    """What the decoder needs, resolved once from a Hugging Face config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    max_segments: int = DEFAULT_MAX_SEGMENTS
    rope_scaling: dict[str, Any] | None = None
    torch_dtype: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
            )
        if cfg.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
        heads = cfg["num_attention_heads"]
        is_qwen2 = model_type == "qwen2"
        rope_scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None and isinstance(rope_scaling, dict):
            rope_theta = rope_scaling.get("rope_theta")
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=True if is_qwen2 else cfg.get("attention_bias", False),
            o_bias=False if is_qwen2 else cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            max_segments=cfg.get("max_segments", DEFAULT_MAX_SEGMENTS),
            rope_scaling=normalize_rope_scaling(rope_scaling),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            raw=dict(cfg),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def with_overrides(self, **kw: Any) -> ModelConfig:
        d = asdict(self)
        d.update(kw)
        return ModelConfig(**d)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json content: the original keys, updated with what may have changed."""
        out = dict(self.raw)
        out.update(vocab_size=self.vocab_size, max_segments=self.max_segments)
        if self.rope_scaling is not None:
            out["rope_scaling"] = self.rope_scaling
        return out


def normalize_rope_scaling(rs: dict[str, Any] | None) -> dict[str, Any] | None:
    """Return None for no scaling, else a dict with a "rope_type" key ("llama3" or "yarn")."""
    if not rs:
        return None
    rs = dict(rs)
    rope_type = rs.get("rope_type", rs.get("type"))
    if rope_type in (None, "default"):
        return None
    if rope_type not in ("llama3", "yarn"):
        raise ValueError(f"unsupported rope scaling {rope_type!r}; supported: none, llama3, yarn")
    rs["rope_type"] = rope_type
    rs.pop("type", None)
    rs.pop("rope_theta", None)
    return rs


def reference_yarn(max_path_tokens: int) -> dict[str, Any] | None:
    """The rope scaling the reference engine uses for long paths (SPEC §5.6)."""
    if max_path_tokens <= 8192:
        return None
    return {
        "rope_type": "yarn",
        "factor": max_path_tokens / 8192,
        "original_max_position_embeddings": 9280,
        "beta_fast": 32,
        "beta_slow": 1,
    }


ROPE_SCALING_CHOICES = ("auto", "none", "reference")  # or a JSON object


def resolve_rope_scaling(choice: str | dict[str, Any], checkpoint: dict[str, Any],
                         max_path_tokens: int, parallel: bool = True) -> dict[str, Any] | None:
    """The rope scaling a checkpoint runs with (None: plain RoPE), from `--rope-scaling`.

    `checkpoint` is its config.json; `max_path_tokens` the path budget; `parallel` False for plain
    traces (the sequential and majority baselines).
    - "auto": the checkpoint's own `rope_scaling` when it has one (a Llama's llama3 is never
      overridden); else, for a Qwen2 checkpoint running ParaThinker paths, the reference's YaRN for
      that budget (SPEC §5.6: none up to 8192 tokens); else none.
    - "none": nothing added (the checkpoint's own scaling, if any, stays).
    - "reference": the reference's YaRN for the budget in place of anything the checkpoint has, as
      its engine's `hf_overrides` do (plain RoPE up to 8192 tokens).
    - a dict: that scaling (`{"rope_type": "default"}` is plain RoPE).
    """
    own = normalize_rope_scaling(checkpoint.get("rope_scaling") or checkpoint.get("rope_parameters"))
    if isinstance(choice, dict):
        return normalize_rope_scaling(choice)
    if choice == "none":
        return own
    if choice == "reference":
        return reference_yarn(max_path_tokens)
    if choice == "auto":
        if own is not None or checkpoint.get("model_type") != "qwen2" or not parallel:
            return own
        return reference_yarn(max_path_tokens)
    raise ValueError(f"unknown rope scaling {choice!r}; use one of {ROPE_SCALING_CHOICES} or a "
                     "JSON object")


def parse_rope_scaling(text: str) -> str | dict[str, Any]:
    """A `--rope-scaling` value: one of ROPE_SCALING_CHOICES, or a JSON object (checked)."""
    if text in ROPE_SCALING_CHOICES:
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"--rope-scaling takes {', '.join(ROPE_SCALING_CHOICES)} or a JSON object, "
                         f"got {text!r}")
    normalize_rope_scaling(value)  # an unsupported rope_type fails here, not after loading
    return value


# Bounds that keep the sampler finite in float32: logits / temperature must not overflow (a tiny
# temperature) nor become inf / inf (one beyond float32's range), and top_p must stay above the
# float32 zero it would round to (then every token is dropped and softmax gives NaN).
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-5, 100.0
MIN_TOP_P = 1e-6


def check_sampling(temperature: float, top_p: float) -> None:
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, "
                         f"{MAX_TEMPERATURE}], got {temperature}")
    if not MIN_TOP_P <= top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] and at least {MIN_TOP_P}, got {top_p}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request is generated (SPEC §5). temperature 0 is greedy; top_k <= 0 disables
    top-k; min_path_tokens masks end tokens until a path (tags included) could hold that many.

    Gated thinking (an extension of SPEC §5, issue 23; engine/confidence.py states the rules):
    - confidence_window > 0: each path's confidence (DeepConf's lowest group confidence) over
      windows of that many sampled tokens, each token's confidence being minus the mean of the
      top `confidence_top_k` log-probabilities of the distribution it was drawn from;
    - prune_confidence: a path whose group confidence (window full) falls below it is closed at
      that step with its end tag, finish reason "pruned" (never the last open path);
    - stop_on_agreement > 0: once that many finished paths have the same answer (their last
      \\boxed{}, equal after `spec.answers.normalize_answer`), the open paths are cut and the
      summary starts; together with min_finished_paths, whichever rule fires first."""

    num_paths: int = 4
    max_path_tokens: int = 16384
    min_path_tokens: int = 0
    max_summary_tokens: int = 1024
    min_finished_paths: int = 1
    temperature: float = 0.5
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    confidence_window: int = 0  # 0: no confidence computed
    confidence_top_k: int = 20
    prune_confidence: float | None = None
    stop_on_agreement: int = 0  # 0: off

    def __post_init__(self) -> None:
        if self.num_paths < 1:
            raise ValueError(f"num_paths must be >= 1, got {self.num_paths}")
        if not 1 <= self.min_finished_paths <= self.num_paths:
            raise ValueError(
                f"min_finished_paths must be in 1..num_paths={self.num_paths}, "
                f"got {self.min_finished_paths}"
            )
        if self.max_path_tokens < 2:
            raise ValueError(
                f"max_path_tokens={self.max_path_tokens} cannot hold <think{{k}}> and "
                "</think{k}>; use at least 2"
            )
        if not 0 <= self.min_path_tokens <= self.max_path_tokens:
            raise ValueError(
                f"min_path_tokens must be in 0..max_path_tokens={self.max_path_tokens}, "
                f"got {self.min_path_tokens}"
            )
        if self.max_summary_tokens < 1:
            raise ValueError(f"max_summary_tokens must be >= 1, got {self.max_summary_tokens}")
        check_sampling(self.temperature, self.top_p)
        self._check_gating()

    def _check_gating(self) -> None:
        if self.confidence_window < 0:
            raise ValueError(f"confidence_window must be >= 0 (0: off), got {self.confidence_window}")
        if self.confidence_top_k < 1:
            raise ValueError(f"confidence_top_k must be >= 1, got {self.confidence_top_k}")
        if self.prune_confidence is not None:
            if not math.isfinite(self.prune_confidence):
                raise ValueError(f"prune_confidence must be a finite number, got "
                                 f"{self.prune_confidence}")
            if self.confidence_window < 1:
                raise ValueError("prune_confidence needs confidence_window > 0 (the window its "
                                 "group confidence is measured over)")
        if not 0 <= self.stop_on_agreement <= self.num_paths:
            raise ValueError(f"stop_on_agreement must be in 0..num_paths={self.num_paths} "
                             f"(0: off), got {self.stop_on_agreement}")

    @property
    def is_gated(self) -> bool:
        """Whether a path's state needs confidence or answers (issue 23's rules)."""
        return self.confidence_window > 0 or self.stop_on_agreement > 0


@dataclass(frozen=True)
class PlainParams:
    """One ordinary reasoning trace (the sequential and majority baselines): up to `max_tokens`
    generated tokens, ending at EOS; nothing is masked."""

    max_tokens: int = 32768
    temperature: float = 0.5
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        check_sampling(self.temperature, self.top_p)
