import pytest
import torch

from parathinker.testing.checkpoints import make_checkpoint, make_tokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory, tokenizer):
    """A tiny Qwen2 ParaThinker checkpoint (random, non-zero seg tables)."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen2"), tokenizer=tokenizer, end_boost=1.3)


@pytest.fixture(scope="session")
def llm(ckpt_dir):
    from parathinker import LLM

    return LLM(str(ckpt_dir), device="cpu", dtype="float32")
