"""The batched engine: paged KV blocks, continuous batching, zero-copy summary."""

from parathinker.engine.engine import Engine

__all__ = ["Engine"]
