"""Helpers for tests and experiments, offline: tiny tokenizers and random checkpoints built in
well under a second (`tiny`, `checkpoints`), and a live server on a free port (`servers`)."""
