"""The decoder and its checkpoint loader/saver."""

from parathinker.model.checkpoint import load_model, load_tokenizer, resolve_model_dir, save_model
from parathinker.model.decoder import ParaThinkerForCausalLM

__all__ = ["ParaThinkerForCausalLM", "load_model", "load_tokenizer", "resolve_model_dir", "save_model"]
