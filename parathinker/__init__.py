"""ParaThinker: native parallel thinking for LLMs (P reasoning paths, then one summary)."""

from parathinker.config import ModelConfig, PlainParams, SamplingParams
from parathinker.engine.outputs import PathOutput, RequestOutput, SequentialOutput, SummaryOutput

__version__ = "0.1.0"
__all__ = [
    "LLM", "ModelConfig", "PathOutput", "PlainParams", "RequestOutput", "SamplingParams",
    "SequentialOutput", "SummaryOutput",
]


def __getattr__(name: str):  # `LLM` pulls in transformers; load it on first use only
    if name == "LLM":
        from parathinker.llm import LLM

        return LLM
    raise AttributeError(name)
