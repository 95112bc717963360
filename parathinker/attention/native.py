"""The CPU decode kernels of `cpu_decode.cpp`, compiled on first use and loaded with ctypes.

Built with the machine's C++ compiler (`$CXX`, else g++ or c++) for this CPU (-march=native,
OpenMP: the process's libgomp, the one torch loaded, so the kernels share torch's threads), into
`$XDG_CACHE_HOME/parathinker` (default ~/.cache/parathinker), named by a hash of the source, the
compiler, its flags and the CPU, so a changed source or another CPU builds anew. It takes about a
second, once per machine.

Nothing depends on it: without a compiler, or if the build fails (a warning says why), or with
PARATHINKER_NATIVE=0, `kernels()` is None and the runs backend uses its matmuls instead
(`attention.long_decode`), which the tests hold the kernels to.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
HEAD_DIMS = (16, 32, 64, 128)  # what the kernels serve,
MAX_GROUP = 8  # with at most this many query heads per KV head


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be built (see the module docstring)."""
    if os.environ.get("PARATHINKER_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"parathinker: CPU decode kernels unavailable, using matmuls ({e})",
                      stacklevel=2)
        return None
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.decode_scores.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, ptr, i32, i32, i32, i64, i32]
    lib.decode_pv.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, i64, i32, i32, i32, i64, i32]
    lib.decode_scores.restype = lib.decode_pv.restype = i32
    return lib


def _build() -> Path:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise OSError("no C++ compiler (set CXX)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cxx.encode(), " ".join(FLAGS).encode(),
                                     _cpu_identity().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "parathinker"
    target = cache / f"cpu_decode-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            raise OSError(f"{cxx} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: another process building it too finds a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _cpu_identity() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's model and flags."""
    parts = [platform.machine()]
    try:
        for line in open("/proc/cpuinfo"):
            if line.split(":")[0].strip() in ("model name", "flags", "Features"):
                parts.append(line.strip())
            if len(parts) >= 3:
                break
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def serves(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernels serve this step: float32 on the CPU, a head_dim and group they
    were built for, and a pool whose slots are rows of head_dim contiguous floats."""
    _, hkv, _, d = k_cache.shape
    g = q.shape[1] // hkv
    return (q.device.type == "cpu" and q.dtype == k_cache.dtype == torch.float32
            and d in HEAD_DIMS and 1 <= g <= MAX_GROUP and k_cache.stride(3) == 1
            and k_cache.stride(2) == d and kernels() is not None)


def decode_scores(q: torch.Tensor, k: torch.Tensor, scores: torch.Tensor, pieces: torch.Tensor,
                  chunks: torch.Tensor, seqs: torch.Tensor) -> None:
    """q [B, Hkv, G, D] contiguous, k [Hkv, S, D] (one layer of the pool), scores flat (each
    sequence's [Hkv, G, C] at its offset); tables as in cpu_decode.cpp."""
    hkv, _, d = k.shape
    with torch.profiler.record_function("parathinker::decode_scores"):  # named in profiles
        rc = kernels().decode_scores(q.data_ptr(), k.data_ptr(), scores.data_ptr(),
                                     pieces.data_ptr(), chunks.data_ptr(), len(chunks),
                                     seqs.data_ptr(), hkv, q.shape[2], d, k.stride(0),
                                     torch.get_num_threads())
    assert rc == 0, "decode_scores: shape not served (check native.serves first)"


def decode_pv(probs: torch.Tensor, v: torch.Tensor, partial: torch.Tensor, out: torch.Tensor,
              pieces: torch.Tensor, chunks: torch.Tensor, seqs: torch.Tensor) -> None:
    """out [B, Hkv, G, D] = P @ V per sequence; partial [N chunks, Hkv, G, D] scratch."""
    hkv, _, d = v.shape
    with torch.profiler.record_function("parathinker::decode_pv"):
        rc = kernels().decode_pv(probs.data_ptr(), v.data_ptr(), partial.data_ptr(),
                                 out.data_ptr(), pieces.data_ptr(), chunks.data_ptr(), len(chunks),
                                 seqs.data_ptr(), len(seqs), hkv, out.shape[2], d, v.stride(0),
                                 torch.get_num_threads())
    assert rc == 0, "decode_pv: shape not served (check native.serves first)"
