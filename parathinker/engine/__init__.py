"""The batched engine: paged KV blocks, continuous batching, zero-copy summary.

`Engine` is loaded on first use, so that the engine's torch-free parts (`outputs`) and the
sampler import without the model.
"""

__all__ = ["LAYOUTS", "Engine"]


def __getattr__(name: str):
    if name in __all__:
        from parathinker.engine import engine

        return getattr(engine, name)
    raise AttributeError(name)
