"""Load and save Hugging Face checkpoint directories (SPEC §1).

A directory holds config.json, model.safetensors (or shards + model.safetensors.index.json) and
tokenizer files. The only ParaThinker weights are `model.layers.{i}.self_attn.seg_embeddings.weight`;
a base model without them loads with zero tables. Saving writes the same layout, so a stock
`Qwen2ForCausalLM` still loads the result (it ignores the extra tensors).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from parathinker.config import ModelConfig
from parathinker.model.decoder import ParaThinkerForCausalLM
from parathinker.model.fused import hf_state_dict
from parathinker.model.rope import rope_parameters

log = logging.getLogger(__name__)

SEG_KEY = "model.layers.{}.self_attn.seg_embeddings.weight"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def _looks_local(name: str) -> bool:
    """A path, not a hub id ("namespace/name"): absolute, ./ ../ ~, or more than one slash."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def resolve_model_dir(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local directory as it is, else a hub id: the local HF cache, then a download."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass a checkpoint directory (with config.json)")
    name = str(name_or_path)
    if _looks_local(name):
        parent = next((p for p in path.absolute().parents if p.is_dir()), None)
        raise FileNotFoundError(f"the checkpoint directory {name} does not exist (the nearest "
                                f"existing directory is {parent})")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    errors = []
    for local_only in (True, False):
        try:
            return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS,
                                          local_files_only=local_only))
        except HFValidationError:
            raise FileNotFoundError(f"{name!r} is not a local directory, nor a Hugging Face hub id "
                                    "(namespace/name)") from None
        except Exception as e:  # offline, unknown repo: both mean "not found here"
            errors.append(f"{type(e).__name__}: {e}".splitlines()[0])
    raise FileNotFoundError(
        f"model {name!r} not found: there is no such local directory, it is not in the Hugging "
        f"Face cache, and it could not be downloaded from the hub ({errors[-1]}). "
        "Pass a local checkpoint directory with config.json, *.safetensors and tokenizer files."
    )


def read_state_dict(model_dir: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / s for s in shards]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(f, device="cpu"))
        return state
    pickles = sorted(model_dir.glob("*.bin"))
    if pickles and not allow_pickle:
        raise ValueError(
            f"{model_dir} has only pickle weights ({pickles[0].name}); loading pickles can run "
            "arbitrary code. If you trust them, convert them once: python -m "
            f"parathinker.model.to_safetensors {model_dir}  (or pass --allow-pickle / "
            "LLM(..., allow_pickle=True))"
        )
    if pickles:
        log.warning("loading pickle weights from %s (allow_pickle): only do this for checkpoints "
                    "you trust", model_dir)
        state = {}
        for f in pickles:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise FileNotFoundError(f"no *.safetensors (or *.bin) weights in {model_dir}")


def load_model(model_dir: Path, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
               config_overrides: dict[str, Any] | None = None) -> ParaThinkerForCausalLM:
    config_file = model_dir / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    raw = json.loads(config_file.read_text())
    state = read_state_dict(model_dir, allow_pickle)
    seg0 = state.get(SEG_KEY.format(0))
    if seg0 is not None and "max_segments" not in raw:
        raw["max_segments"] = seg0.shape[0]
    cfg = ModelConfig.from_dict(raw)
    if config_overrides:
        cfg = cfg.with_overrides(**config_overrides)
    with torch.device("meta"):
        model = ParaThinkerForCausalLM(cfg)
    expected = set(model.state_dict())
    missing_seg = [SEG_KEY.format(i) for i in range(cfg.num_hidden_layers)
                   if SEG_KEY.format(i) not in state]
    if missing_seg:
        if len(missing_seg) < cfg.num_hidden_layers:
            raise ValueError(f"{model_dir}: seg tables missing for some layers only: {missing_seg}")
        log.info("%s has no seg_embeddings tables (a base model): starting them at zero", model_dir)
        for key in missing_seg:
            state[key] = torch.zeros(cfg.max_segments, cfg.head_dim)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    unexpected = [k for k in state if k not in expected and not k.endswith(IGNORED_SUFFIXES)]
    missing = sorted(expected - set(state))
    if missing or unexpected:
        raise ValueError(f"{model_dir}: weights do not match the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    state = {k: state[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    inv_freq, _ = rope_parameters(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    model.inv_freq = inv_freq.to(device)  # the buffer was built on the meta device
    return model.eval()


def save_model(model: ParaThinkerForCausalLM, out_dir: str | Path, tokenizer: Any = None,
               max_shard_bytes: int = 4 << 30) -> Path:
    """Write config.json, safetensors (sharded above `max_shard_bytes`) and the tokenizer, under
    the Hugging Face names (a model fused for inference is split back)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: v.detach().contiguous().cpu() for k, v in hf_state_dict(model).items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    for old in out.glob("model*.safetensors"):
        old.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = cfg.to_hf_dict()
    hf.setdefault("architectures", ["Qwen2ForCausalLM" if cfg.model_type == "qwen2"
                                    else "LlamaForCausalLM"])
    hf["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# what a tokenizer can be loaded from: any one of these sets of files
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def check_tokenizer_files(model_dir: Path) -> None:
    """FileNotFoundError naming the files when `model_dir` holds no tokenizer."""
    if any(all((model_dir / f).is_file() for f in files) for files in TOKENIZER_FILES) or \
            any(model_dir.glob("*.tiktoken")):
        return
    options = ", or ".join(" + ".join(files) for files in TOKENIZER_FILES)
    present = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
    raise FileNotFoundError(
        f"{model_dir} has no tokenizer files: it needs {options} (with tokenizer_config.json), "
        f"e.g. copied from the model it was trained from; it holds {present}")


def load_tokenizer(model_dir: Path) -> Any:
    """The checkpoint's tokenizer exactly as its tokenizer.json defines it.

    transformers 5's AutoTokenizer rebuilds a tokenizer from the class that tokenizer_config.json
    or config.json names, replacing tokenizer.json's pre-tokenizer and decoder with that class's
    defaults: DeepSeek-R1-Distill checkpoints say `LlamaTokenizerFast` and get a Metaspace
    pre-tokenizer (spaces vanish), Qwen2 checkpoints get Qwen2's digit splitting (transformers
    issues #45488, #45920). PreTrainedTokenizerFast loads tokenizer.json verbatim, with the
    special tokens and chat template of tokenizer_config.json."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    check_tokenizer_files(model_dir)
    try:
        if (model_dir / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(model_dir)
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        raise ValueError(f"could not load a tokenizer from {model_dir}: {e}") from e
