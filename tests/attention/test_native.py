"""The CPU decode kernels (attention/cpu_decode.cpp via attention.native) against the definition
written here in float64, and against their twin, the runs backend's matmuls: shapes of the tiny,
small and 1.5B models and odd ones, contexts in runs of odd lengths and in several chunks; results
that do not depend on the thread count; and a build that fails falls back with a warning."""

import shutil

import pytest
import torch

import parathinker.attention.long_decode as long_decode
from parathinker.attention import native
from parathinker.attention.long_decode import LongDecodes
from tests.attention.test_paged_attention import naive

# per sequence, its context's runs of the pool (own slot last): one slot; odd runs; a chunk's
# worth and more in one run; runs shorter than the kernel's 16-key blocks
CONTEXTS = [[(0, 1)], [(5, 17), (100, 1000), (2000, 1500)], [(3600, 2048)], [(5700, 33), (5800, 7)]]
SLOTS = 6000


@pytest.fixture
def kernels():
    """The kernels, built: skipped only where the machine has no C++ compiler at all."""
    if native.kernels() is None and not shutil.which("g++") and not shutil.which("c++"):
        pytest.skip("no C++ compiler")
    assert native.kernels() is not None, "a compiler is here but the kernels did not build"


def attend_all(layers, q, k, v, rows, contexts, use_native, monkeypatch):
    monkeypatch.setattr(long_decode, "USE_NATIVE", use_native)
    decodes = LongDecodes(rows, contexts, torch.tensor(rows), rows == list(range(len(rows))))
    outs = [decodes.attend(layer, q, k, v) for layer in range(layers)]
    assert (decodes.buf.tables is not None) == use_native  # the path asked for ran
    return outs


@pytest.mark.parametrize("hkv,g,d", [(2, 2, 16), (2, 4, 64), (2, 6, 128), (1, 8, 32), (3, 1, 64),
                                     (2, 5, 128)])
@pytest.mark.parametrize("chunk", [1024, 64])
def test_kernels_equal_the_definition_and_the_matmuls(kernels, hkv, g, d, chunk, monkeypatch):
    monkeypatch.setattr(long_decode, "CHUNK", chunk)  # 64: every context in many chunks
    torch.manual_seed(0)
    layers = 2
    k, v = torch.randn(layers, hkv, SLOTS, d), torch.randn(layers, hkv, SLOTS, d)
    rows = [5, 0, 2, 3]  # out of order: the tokens of other sequences in between
    q = torch.randn(6, hkv * g, d)
    mine = attend_all(layers, q, k, v, rows, CONTEXTS, True, monkeypatch)
    twin = attend_all(layers, q, k, v, rows, CONTEXTS, False, monkeypatch)
    for layer in range(layers):
        assert torch.allclose(mine[layer], twin[layer], atol=2e-6)
        for i, runs in enumerate(CONTEXTS):
            ctx = [a + j for a, n in runs for j in range(n)]
            expected = naive(q[rows[i]][None], k[layer], v[layer], ctx, 1)[0]
            assert torch.allclose(mine[layer][i], expected, atol=1e-5), (layer, i)


def test_results_do_not_depend_on_the_thread_count(kernels, monkeypatch):
    torch.manual_seed(1)
    k, v = torch.randn(1, 2, SLOTS, 64), torch.randn(1, 2, SLOTS, 64)
    q = torch.randn(4, 8, 64)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(attend_all(1, q, k, v, [0, 1, 2, 3], CONTEXTS, True, monkeypatch)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """kernels() forgets its result before and after, the build goes to an empty cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.kernels.cache_clear()
    yield tmp_path
    native.kernels.cache_clear()


def test_a_failed_build_warns_and_the_matmuls_serve(fresh_build, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    with pytest.warns(UserWarning, match="CPU decode kernels unavailable"):
        assert native.kernels() is None
    assert not list(fresh_build.rglob("*.so"))  # nothing half-built left
    torch.manual_seed(2)
    k, v = torch.randn(1, 2, SLOTS, 16), torch.randn(1, 2, SLOTS, 16)
    q = torch.randn(4, 4, 16)
    decodes = LongDecodes([0, 1, 2, 3], CONTEXTS, torch.arange(4), True)
    out = decodes.attend(0, q, k, v)
    assert decodes.buf.tables is None
    ctx = [a + j for a, n in CONTEXTS[1] for j in range(n)]
    assert torch.allclose(out[1], naive(q[1][None], k[0], v[0], ctx, 1)[0], atol=1e-5)


def test_turned_off_by_the_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("PARATHINKER_NATIVE", "0")
    assert native.kernels() is None
    assert not native.serves(torch.zeros(1, 4, 16), torch.zeros(1, 2, 8, 16))


def test_built_once_per_source_and_cpu(kernels, fresh_build):
    assert native.kernels() is not None
    (built,) = fresh_build.rglob("*.so")
    native.kernels.cache_clear()
    assert native.kernels() is not None  # found, not built again
    assert list(fresh_build.rglob("*.so")) == [built]


def test_serves_only_what_it_was_built_for(kernels):
    pool = torch.zeros(2, 2, 8, 64)
    assert native.serves(torch.zeros(1, 8, 64), pool)
    assert not native.serves(torch.zeros(1, 8, 64, dtype=torch.bfloat16), pool.bfloat16())
    assert not native.serves(torch.zeros(1, 18, 64), pool)  # 9 query heads per KV head
    assert not native.serves(torch.zeros(1, 8, 48), torch.zeros(2, 2, 8, 48))  # head_dim 48
    assert not native.serves(torch.zeros(1, 8, 64), torch.zeros(2, 2, 64, 8).transpose(2, 3))
