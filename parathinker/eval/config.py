"""`EvalConfig`: everything that decides what an eval run produces, validated once.

    cfg = EvalConfig(model="Leslie04/ParaThinker-1.5B", output="runs/x", paths=(2, 4, 8),
                     layouts=("native", "reference"))
    cfg.configurations()   # [("parathinker", 2, "native"), ..., ("parathinker", 8, "reference")]

A configuration is a mode, a number of paths and, for ParaThinker requests, a layout (SPEC §4
native, SPEC §6 reference) and a `Gate` (how thinking may end early: `cfg.gates()`, every
--stop-on-agreement x --prune-confidence pair); plain traces (sequential, majority) have no
layout (None) and no gate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from parathinker.config import PlainParams, SamplingParams, parse_rope_scaling, resolve_rope_scaling
from parathinker.engine.confidence import check_ungated

MODES = ("parathinker", "sequential", "majority")
LAYOUTS = ("native", "reference")


@dataclass(frozen=True)
class Gate:
    """Issue 23's early ends of a ParaThinker sample (SamplingParams' fields of the same names):
    the open paths are cut once `stop_on_agreement` finished paths give the same answer (0: off);
    a path whose group confidence falls below `prune_confidence` is closed (None: off). The
    default gate is the ungated request."""

    stop_on_agreement: int = 0
    prune_confidence: float | None = None

    @property
    def key(self) -> tuple[int, float | None]:
        return (self.stop_on_agreement, self.prune_confidence)

    @property
    def label(self) -> str:
        """" agree=2 prune<1.5" (each rule that is on), "" for the ungated request."""
        return ((f" agree={self.stop_on_agreement}" if self.stop_on_agreement else "")
                + (f" prune<{self.prune_confidence:g}" if self.prune_confidence is not None else ""))


@dataclass(frozen=True)
class EvalConfig:
    """The CLI builds it (docs/EVAL.md); `run` fills `checkpoint` from the model's config.json."""

    model: str
    output: str
    benchmarks: tuple[str, ...] = ("aime24",)
    data: tuple[str, ...] = ()  # JSONL files: NAME=FILE, or one FILE per benchmark; () = built-in
    modes: tuple[str, ...] = ("parathinker",)
    paths: tuple[int, ...] = (2, 4, 8)
    majority_n: tuple[int, ...] = ()  # () = the same values as `paths`
    layouts: tuple[str, ...] = ("native",)  # parathinker mode: each layout in turn
    samples: int = 1
    max_path_tokens: int = 16384
    max_summary_tokens: int = 1024
    min_finished_paths: int = 1  # clipped to P; 1 = first-finish
    stop_on_agreement: tuple[int, ...] = (0,)  # each a run dimension (`gates`); 0 = off
    prune_confidence: tuple[float | None, ...] = (None,)  # each a run dimension; None = off
    confidence_window: int = 0  # tokens per group confidence; 0 = no confidence computed
    confidence_top_k: int = 20  # log-probabilities per token confidence
    max_tokens: int | None = None  # sequential trace budget; None = 2 x max_path_tokens
    majority_max_tokens: int | None = None  # each majority trace; None = max_path_tokens
    temperature: float = 0.5
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    resume: bool = False
    limit: int | None = None
    endpoint: str | None = None  # URLs and files of URLs, comma-separated (eval/endpoints.py)
    request_timeout: float = 3600.0
    batch_size: int = 64
    concurrency: int | None = None  # requests in flight per endpoint; None = batch_size
    server_retries: int = 5  # failures in a row before an endpoint is dropped for the run
    device: str = "auto"
    dtype: str = "auto"
    rope_scaling: str | dict[str, Any] = "auto"  # parathinker.config.resolve_rope_scaling
    linear: str = "auto"
    attention: str = "auto"
    compile: bool | None = None  # --compile / --no-compile; None: on for CUDA (engine.graphs)
    allow_pickle: bool = False  # --allow-pickle: a checkpoint with only *.bin weights
    save_text: bool = False
    api_key: str | None = field(default=None, repr=False)
    checkpoint: dict[str, Any] = field(default_factory=dict, repr=False)  # its config.json

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"unknown mode(s) {', '.join(bad) or '(none)'}: use {', '.join(MODES)}")
        if not self.benchmarks or any(not b for b in self.benchmarks):
            raise ValueError("--benchmark needs at least one name")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ValueError(f"--benchmark lists a name twice: {','.join(self.benchmarks)}")
        self.data_files()  # checks the --data / --benchmark pairing
        for name, values in (("--paths", self.paths), ("--majority-n", self.majority_n)):
            if any(v < 1 for v in values):
                raise ValueError(f"{name} values must be >= 1, got {','.join(map(str, values))}")
        if "parathinker" in self.modes and not self.paths:
            raise ValueError("--paths needs at least one value")
        bad = [x for x in self.layouts if x not in LAYOUTS]
        if bad or not self.layouts:
            raise ValueError(f"unknown layout(s) {', '.join(bad) or '(none)'}: use {', '.join(LAYOUTS)}")
        checks = (("--samples", self.samples, 1), ("--batch-size", self.batch_size, 1),
                  ("--max-path-tokens", self.max_path_tokens, 2),
                  ("--max-summary-tokens", self.max_summary_tokens, 1),
                  ("--min-finished-paths", self.min_finished_paths, 1),
                  ("--max-tokens", self.max_tokens or 1, 1),
                  ("--majority-max-tokens", self.majority_max_tokens or 1, 1),
                  ("--limit", 1 if self.limit is None else self.limit, 1))  # 0: an empty report
        for name, value, low in checks:
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self._check_gates()
        if isinstance(self.rope_scaling, str):
            parse_rope_scaling(self.rope_scaling)  # raises for an unknown choice
        if self.request_timeout <= 0:
            raise ValueError(f"--request-timeout must be > 0, got {self.request_timeout}")
        for name, value in (("--concurrency", 1 if self.concurrency is None else self.concurrency),
                            ("--server-retries", self.server_retries)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.endpoints  # noqa: B018 - raises for a malformed URL or an empty file
        PlainParams(max_tokens=1, temperature=self.temperature, top_p=self.top_p)  # same checks as sampling

    def _check_gates(self) -> None:
        if not self.stop_on_agreement or not self.prune_confidence:
            raise ValueError("--stop-on-agreement and --prune-confidence need at least one value")
        if any(v < 0 for v in self.stop_on_agreement):
            raise ValueError("--stop-on-agreement values must be >= 0 (0: off), got "
                             f"{','.join(map(str, self.stop_on_agreement))}")
        if self.paths and max(self.stop_on_agreement) > max(self.paths):
            raise ValueError(f"--stop-on-agreement {max(self.stop_on_agreement)} needs that many "
                             f"paths, but --paths goes up to {max(self.paths)}")
        if any(v is not None for v in self.prune_confidence) and self.confidence_window < 1:
            raise ValueError("--prune-confidence needs --confidence-window > 0 (the window a "
                             "path's group confidence is measured over)")
        for name, value, low in (("--confidence-window", self.confidence_window, 0),
                                 ("--confidence-top-k", self.confidence_top_k, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if "reference" in self.layouts and "parathinker" in self.modes:  # refused now, not midway
            p = max(self.paths)
            for gate in self.gates(p):
                try:
                    check_ungated(SamplingParams(
                        num_paths=p, confidence_window=self.confidence_window,
                        confidence_top_k=self.confidence_top_k,
                        stop_on_agreement=gate.stop_on_agreement,
                        prune_confidence=gate.prune_confidence))
                except ValueError as e:
                    raise ValueError(f"--layout reference with --confidence-window, "
                                     f"--prune-confidence or --stop-on-agreement: {e}") from None

    def gates(self, num_paths: int) -> list[Gate]:
        """The gates a parathinker configuration with `num_paths` paths runs under: every
        --stop-on-agreement x --prune-confidence pair, but no agreement of more paths than it has."""
        pairs = dict.fromkeys((a, c) for a in self.stop_on_agreement for c in self.prune_confidence
                              if a <= num_paths)
        return [Gate(a, c) for a, c in pairs]

    def data_files(self) -> dict[str, str]:
        """--data entries by benchmark: `NAME=FILE`, or plain FILEs one per --benchmark name in order."""
        named = dict(d.split("=", 1) for d in self.data if "=" in d and d.split("=", 1)[0] in self.benchmarks)
        plain = [d for d in self.data if not ("=" in d and d.split("=", 1)[0] in self.benchmarks)]
        if plain and (named or len(plain) != len(self.benchmarks)):
            raise ValueError(f"{len(plain)} --data file(s) for {len(self.benchmarks)} benchmark(s): pass one "
                             "--data FILE per --benchmark name in the same order, or --data NAME=FILE")
        return named or dict(zip(self.benchmarks, plain))

    @property
    def sequential_max_tokens(self) -> int:
        return self.max_tokens or 2 * self.max_path_tokens

    @property
    def vote_max_tokens(self) -> int:
        return self.majority_max_tokens or self.max_path_tokens

    @property
    def vote_sizes(self) -> tuple[int, ...]:
        return self.majority_n or self.paths

    @property
    def endpoints(self) -> tuple[str, ...]:
        """--endpoint as normalized URLs (`.../v1`), files of URLs read; () for the engine."""
        from parathinker.client.endpoints import endpoint_urls

        return endpoint_urls([self.endpoint]) if self.endpoint else ()

    @property
    def endpoint_concurrency(self) -> int:
        return self.batch_size if self.concurrency is None else self.concurrency

    @property
    def backend(self) -> str:
        return "endpoint" if self.endpoint else "engine"

    def configurations(self) -> list[tuple[str, int, str | None]]:
        """(mode, num_paths, layout) in the order they run: each layout of parathinker mode in
        turn (one engine each), plain traces once (layout None)."""
        out: list[tuple[str, int, str | None]] = []
        for mode in self.modes:
            if mode == "parathinker":
                out += [(mode, n, lay) for lay in self.layouts for n in dict.fromkeys(self.paths)]
            else:
                sizes = self.vote_sizes if mode == "majority" else (1,)
                out += [(mode, n, None) for n in dict.fromkeys(sizes)]
        return out

    def rope_for(self, mode: str) -> dict[str, Any] | None:
        """The rope scaling of the engine that runs `mode` (None: plain RoPE; always None for an
        endpoint, which has its own): `--rope-scaling` resolved for this checkpoint."""
        if self.backend != "engine":
            return None
        return resolve_rope_scaling(self.rope_scaling, self.checkpoint, self.max_path_tokens,
                                    parallel=mode == "parathinker")

    def settings(self, mode: str, num_paths: int, gate: Gate = Gate()) -> dict[str, Any]:
        """What shaped a sample besides its seed and layout: stored with it, compared on --resume.
        The gating settings appear only where confidence or a gate is on, so the samples of a run
        without them keep resuming as before."""
        out: dict[str, Any] = {"model": self.model, "backend": self.backend, "temperature": self.temperature,
                               "top_p": self.top_p, "top_k": self.top_k, "base_seed": self.seed}
        if mode == "parathinker":
            out.update(max_path_tokens=self.max_path_tokens, max_summary_tokens=self.max_summary_tokens,
                       min_finished_paths=min(self.min_finished_paths, num_paths))
            if self.confidence_window or gate != Gate():
                out.update(confidence_window=self.confidence_window,
                           confidence_top_k=self.confidence_top_k,
                           stop_on_agreement=gate.stop_on_agreement,
                           prune_confidence=gate.prune_confidence)
        else:
            out.update(max_tokens=self.sequential_max_tokens if mode == "sequential" else self.vote_max_tokens)
        out["rope_scaling"] = self.rope_for(mode)
        return out

    def public_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("api_key")
        d.pop("checkpoint")
        d.update(resolved_max_tokens=self.sequential_max_tokens,
                 resolved_majority_max_tokens=self.vote_max_tokens, resolved_majority_n=list(self.vote_sizes))
        return d
