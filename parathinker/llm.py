"""`LLM`: the public entry point. Loads a checkpoint, validates requests, runs generation.

    from parathinker import LLM, SamplingParams
    llm = LLM("Leslie04/ParaThinker-1.5B", device="cuda", dtype="bfloat16")
    out = llm.generate(["What is 1+1?"], SamplingParams(num_paths=4))[0]
    print(out.answer)
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from parathinker.config import PlainParams, SamplingParams, normalize_rope_scaling
from parathinker.engine import LAYOUTS, Engine
from parathinker.engine.confidence import check_ungated
from parathinker.engine.engine import check_prompt
from parathinker.engine.graphs import resolve_compile
from parathinker.engine.request import Request
from parathinker.model.checkpoint import load_model, load_tokenizer, resolve_model_dir
from parathinker.model.fast_linear import apply_linear_backend
from parathinker.engine.outputs import (RequestOutput, SequentialOutput, build_output,
                                        request_output, trace_output)
from parathinker.engine.slow_twin import RawRequestOutput, generate_request
from parathinker.spec.answers import answer_key
from parathinker.spec.budgets import check_context, check_trace
from parathinker.spec.reference_layout import ReferenceTokens, check_params, pad_prompt
from parathinker.spec.tokens import (DEFAULT_PROMPT_TEMPLATE, DEFAULT_SUMMARY_TEMPLATE,
                                SEQUENTIAL_PROMPT_TEMPLATE, ControlTokens)

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    return dev


def resolve_dtype(dtype: str, config_dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32  # no fast bf16 kernels on most CPUs
        return DTYPES.get(config_dtype or "", torch.bfloat16)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


class LLM:
    def __init__(self, model: str | Path, device: str = "auto", dtype: str = "auto", *,
                 allow_pickle: bool = False, revision: str | None = None,
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
                 summary_template: str = DEFAULT_SUMMARY_TEMPLATE,
                 rope_scaling: dict[str, Any] | None = None, block_size: int = 16,
                 num_kv_blocks: int | None = None, kv_cache_memory: int | None = None,
                 max_num_batched_tokens: int = 8192, linear: str = "auto",
                 layout: str = "native", attention: str = "auto",
                 compile: bool | None = None) -> None:
        """compile: decode steps through a compiled forward, replayed as CUDA graphs on CUDA
        (`engine.graphs`); None (default) turns it on for CUDA, off on CPU. Compiled, the linear
        layers stay plain (Inductor picks their kernels): linear must be auto or plain."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
        self.layout = layout
        if "{question}" not in prompt_template:
            raise ValueError("prompt_template must contain '{question}'")
        self.device = resolve_device(device)
        self.compiled = resolve_compile(compile, self.device)
        if self.compiled and linear not in ("auto", "plain"):
            raise ValueError(f"linear={linear!r} cannot be compiled (the graph path's linear "
                             "layers are Inductor's); use linear='auto' or 'plain', or compile=False")
        self.model_dir = resolve_model_dir(model, revision)
        raw_cfg = json.loads((self.model_dir / "config.json").read_text()) \
            if (self.model_dir / "config.json").exists() else {}
        self.dtype = resolve_dtype(dtype, raw_cfg.get("torch_dtype"), self.device)
        overrides = None
        if rope_scaling is not None:
            overrides = {"rope_scaling": normalize_rope_scaling(rope_scaling)}
        self.tokenizer = load_tokenizer(self.model_dir)  # first: cheap, and says which files lack
        self.model = load_model(self.model_dir, self.device, self.dtype, allow_pickle, overrides)
        self.config = self.model.config
        self.linear_backend = apply_linear_backend(self.model, "plain" if self.compiled else linear)
        # a base model (no ParaThinker tokens) still runs plain traces: the sequential and
        # majority baselines; generate() refuses it in validate()
        self.ctrl = ControlTokens.from_tokenizer(self.tokenizer, allow_base=True)
        if not self.ctrl.max_paths:
            log.info("%s has no ParaThinker control tokens: plain traces only (generate_sequential)",
                     self.model_dir)
        self.prompt_template = prompt_template
        self.summary_template = summary_template
        self.summary_template_ids: list[int] = self.tokenizer.encode(
            summary_template, add_special_tokens=False)
        self.max_paths = min(self.ctrl.max_paths, self.config.max_segments - 1)
        self.engine = Engine(self.model, self.ctrl, self.summary_template_ids, block_size,
                             num_kv_blocks, kv_cache_memory, max_num_batched_tokens,
                             layout=layout, attention=attention, compile=self.compiled,
                             answer_of=self.answer_key)
        self._ids = itertools.count()

    def answer_key(self, text_ids: list[int]) -> str | None:
        """A path's answer for stop_on_agreement: its text's last \\boxed{}, normalised
        (`spec.answers.answer_key`)."""
        return answer_key(self.tokenizer.decode(text_ids, skip_special_tokens=False))

    # ----- input handling
    def format_prompt(self, question: str) -> str:
        return self.prompt_template.replace("{question}", question)

    def encode_prompts(self, prompts: Sequence[str] | str | None,
                       prompt_token_ids: Sequence[Sequence[int]] | None,
                       apply_template: bool = True) -> list[list[int]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass either prompts (questions) or prompt_token_ids, not both/neither")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompts must be strings; use prompt_token_ids= for token ids")
            fmt = self.format_prompt if apply_template else (lambda p: p)
            return [self.tokenizer.encode(fmt(p)) for p in prompts]
        out = []
        for i, ids in enumerate(prompt_token_ids or []):
            ids = list(ids)
            if ids:  # an empty one is refused by validate, with the request's other checks
                check_prompt(ids, self.config.vocab_size, f"prompt_token_ids[{i}]")
            out.append(ids)
        return out

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Every check that can fail, before anything runs."""
        if not self.ctrl.max_paths:
            raise ValueError(
                f"{self.model_dir} has no ParaThinker control tokens (<think1>, <summary>, ...): it is a "
                "base model, which runs plain traces only (LLM.generate_sequential, eval --mode "
                "sequential/majority); add the tokens with parathinker.spec.tokens.add_parathinker_tokens "
                "and train them (parathinker train) for parallel thinking"
            )
        if params.num_paths > self.max_paths:
            raise ValueError(
                f"num_paths={params.num_paths} exceeds what this checkpoint supports "
                f"({self.ctrl.max_paths} <think{{k}}> tokens in the tokenizer, max_segments="
                f"{self.config.max_segments}); use num_paths <= {self.max_paths} or add tokens with "
                "parathinker.spec.tokens.add_parathinker_tokens and train them"
            )
        template_len = len(self.summary_template_ids)
        if params.max_summary_tokens <= template_len:
            raise ValueError(
                f"max_summary_tokens={params.max_summary_tokens} cannot hold the summary template "
                f"({template_len} tokens) and an answer; use at least {template_len + 1}"
            )
        check_prompt(prompt_ids, self.config.vocab_size)
        limit = self.config.max_position_embeddings
        if len(prompt_ids) >= limit:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens is longer than the model's "
                             f"context ({limit} positions); shorten it")
        if self.layout == "reference":  # what the reference layout cannot run as it does
            ReferenceTokens.from_ctrl(self.ctrl)
            check_ungated(params)
            check_params(params.num_paths, params.max_path_tokens, params.min_path_tokens,
                         params.min_finished_paths, params.max_summary_tokens, template_len)
        check_context(len(prompt_ids), params.max_path_tokens, params.max_summary_tokens, limit,
                      self.layout, self.tokenizer.bos_token_id is not None)

    def engine_prompt(self, prompt_ids: list[int]) -> list[int]:
        """The ids the engine runs for an encoded prompt: unchanged in the native layout; in the
        reference layout padded as the reference engine does (reference_layout.pad_prompt:
        a second BOS, then <vllm_pad> up to a multiple of 16)."""
        if self.layout != "reference":
            return list(prompt_ids)
        pad = ReferenceTokens.from_ctrl(self.ctrl).pad
        return pad_prompt(prompt_ids, self.tokenizer.bos_token_id, pad)

    # ----- generation
    def generate(self, prompts: Sequence[str] | str | None = None,
                 params: SamplingParams | None = None, *,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None) -> list[RequestOutput]:
        params = params or SamplingParams()
        encoded = self.encode_prompts(prompts, prompt_token_ids)
        for ids in encoded:
            self.validate(ids, params)
        reqs = [self.engine.add_request(f"llm-{next(self._ids)}", self.engine_prompt(ids), params)
                for ids in encoded]
        self.engine.run_to_completion()
        return [self.request_output(r) for r in reqs]

    def validate_trace(self, prompt_ids: list[int], params: PlainParams) -> None:
        """A plain trace's checks (spec.budgets.check_trace): ValueError if it cannot run."""
        check_prompt(prompt_ids, self.config.vocab_size)
        check_trace(len(prompt_ids), params.max_tokens, self.config.max_position_embeddings)

    def generate_sequential(self, prompts: Sequence[str] | str | None = None,
                            params: PlainParams | None = None, *,
                            prompt_token_ids: Sequence[Sequence[int]] | None = None,
                            prompt_template: str = SEQUENTIAL_PROMPT_TEMPLATE
                            ) -> list[SequentialOutput]:
        """Plain single-trace generation (the sequential and majority baselines), batched in the
        same engine; `prompts` are questions put into `prompt_template`."""
        params = params or PlainParams()
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else prompts
            prompts = [prompt_template.replace("{question}", q) if isinstance(q, str) else q
                       for q in prompts]
            encoded = self.encode_prompts(prompts, None, apply_template=False)
        else:
            encoded = self.encode_prompts(None, prompt_token_ids)
        for ids in encoded:
            self.validate_trace(ids, params)
        reqs = [self.engine.add_request(f"seq-{next(self._ids)}", ids, params) for ids in encoded]
        self.engine.run_to_completion()
        return [trace_output(req, self.tokenizer) for req in reqs]

    def generate_slow_twin(self, prompts: Sequence[str] | str | None = None,
                           params: SamplingParams | None = None, *,
                           prompt_token_ids: Sequence[Sequence[int]] | None = None
                           ) -> list[RequestOutput]:
        """The same outputs from the slow twin, one request at a time (the native
        layout's twin: refused under layout='reference', whose slow twin is the test oracle)."""
        if self.layout == "reference":
            raise ValueError("generate_slow_twin is the slow twin of the native layout; an LLM built "
                             "with layout='reference' is checked against tests/oracle_reference.py")
        params = params or SamplingParams()
        encoded = self.encode_prompts(prompts, prompt_token_ids)
        for ids in encoded:
            self.validate(ids, params)
        outputs = []
        for ids in encoded:
            start = time.perf_counter()
            raw = generate_request(self.model, self.ctrl, ids, self.summary_template_ids, params,
                                   answer_of=self.answer_key)
            outputs.append(self.to_output(ids, raw, time.perf_counter() - start))
        return outputs

    def request_output(self, req: Request) -> RequestOutput:
        """An engine request as a RequestOutput (`error` set if it failed): `outputs.request_output`."""
        return request_output(req, self.tokenizer, self.ctrl)

    def to_output(self, prompt_ids: list[int], raw: RawRequestOutput,
                  latency_s: float) -> RequestOutput:
        """A slow-twin result as a RequestOutput, by the same rules as the engine's."""
        return build_output(prompt_ids, raw.path_token_ids, raw.path_finish, raw.summary_token_ids,
                            raw.summary_finish, raw.num_forward_tokens, latency_s,
                            self.tokenizer, self.ctrl, raw.path_confidence)
