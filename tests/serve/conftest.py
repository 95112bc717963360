"""A live server over the tiny checkpoint, shared by the tests of one module.

A module sets `NUM_KV_BLOCKS` to size the server's KV pool (default 1024 blocks).
"""

import pytest

from parathinker import LLM
from parathinker.testing.servers import running_server


@pytest.fixture(scope="module")
def served(request, ckpt_dir):
    """(base URL, the server's LLM). The server's LLM belongs to its engine thread: answers to
    compare with come from the session's `llm` (tests/conftest.py); generating on the server's
    from a test raced that thread (on a loaded machine, a reference request failed)."""
    num_kv_blocks = getattr(request.module, "NUM_KV_BLOCKS", 1024)
    llm = LLM(str(ckpt_dir), device="cpu", dtype="float32", num_kv_blocks=num_kv_blocks)
    with running_server(llm) as url:
        yield url, llm
