"""The batched engine: paged KV blocks, continuous batching, zero-copy summary."""

from parathinker.engine.engine import LAYOUTS, Engine

__all__ = ["LAYOUTS", "Engine"]
