"""A live server over the tiny checkpoint, shared by the tests of one module.

A module sets `NUM_KV_BLOCKS` to size the server's KV pool (default 1024 blocks).
"""

import pytest

from parathinker import LLM
from parathinker.testing.servers import running_server


@pytest.fixture(scope="module")
def served(request, ckpt_dir):
    """(base URL, the server's LLM)."""
    num_kv_blocks = getattr(request.module, "NUM_KV_BLOCKS", 1024)
    llm = LLM(str(ckpt_dir), device="cpu", dtype="float32", num_kv_blocks=num_kv_blocks)
    with running_server(llm) as url:
        yield url, llm


@pytest.fixture(scope="module")
def twin(ckpt_dir):
    """A second LLM of the same checkpoint, for the Python API's answers to compare with. The
    server's own LLM belongs to its engine thread: generating on it from a test races that
    thread (a request just answered may still be stepping), which on a loaded machine failed a
    reference request with a corrupted step."""
    return LLM(str(ckpt_dir), device="cpu", dtype="float32")
