"""rnnrep's C kernels, compiled for this machine on first use: the fused LSTM cell
(`_cell.c`), dropout (`_dropout.c`, used by `rnnrep.dropout`) and the DWS encoder's
fused map layer (`_dws.c`, used by `rnnrep.encoders.dws`).

At a member's size the per-step elementwise work, not the matmul, is most of a
training step, and it is a dozen small ATen ops. One C call per step does it in a
single pass (`rnnrep bench zoo` measures the whole build). The kernel is plain C
with no torch headers: it compiles in about a second with the system C compiler and
loads through ctypes, so installing rnnrep needs no build step. Without a compiler,
or with `RNNREP_CELL_KERNEL=0`, `lstm` runs the same math in torch ops (always so on
GPUs); results then differ in the last bits, not in meaning. The same switch sends
dropout and the DWS layer back to torch ops.

Builds are cached per source, compiler flags and CPU (`-march=native`) under
`$RNNREP_CACHE` (default `~/.cache/rnnrep`), written to a temp name and renamed, so
concurrent Ray actors on one node at worst compile twice.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("_cell.c", "_dropout.c", "_dws.c")]
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fPIC", "-shared"]
# The kernels' threads. Linked by soname, libgomp resolves to the copy torch has
# loaded, so the kernels share torch's thread pool: threads of their own beside
# torch's spinning ones made the DWS step slower on 2 cores. A compiler without
# OpenMP gets the same kernels, single-threaded.
OPENMP = "-fopenmp"
_P, _I = ctypes.c_void_p, ctypes.c_int64


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [l for l in text.splitlines() if l.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    root = os.environ.get("RNNREP_CACHE") or Path.home() / ".cache" / "rnnrep"
    return Path(root) / "kernels"


def _compile(compiler: str, flags: list[str]) -> Path:
    src = b"".join(s.read_bytes() for s in SOURCES)
    key = hashlib.sha256(src + " ".join([compiler, *flags]).encode() + _cpu_id().encode()).hexdigest()[:16]
    target = _cache_dir() / f"cell-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, "-o", tmp, *map(str, SOURCES), "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def find_compiler() -> str | None:
    """`$CC`, else the first of cc, gcc, clang on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled, no compiler, or the build failed: logged)."""
    if os.environ.get("RNNREP_CELL_KERNEL", "1") == "0":
        return None
    compiler = find_compiler()
    if compiler is None:
        log.warning("no C compiler found: the LSTM cell, dropout and DWS layer run as torch ops (slower)")
        return None
    try:
        try:
            path = _compile(compiler, [*FLAGS, OPENMP])
        except subprocess.CalledProcessError:
            path = _compile(compiler, FLAGS)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        log.warning("compiling the C kernels failed, using torch ops: %s", detail)
        return None
    for suffix in ("f32", "f64"):
        getattr(lib, f"cell_forward_{suffix}").argtypes = [_I, _I, _P, _P, _P, _P, _I, _P, _P, _P]
        getattr(lib, f"cell_backward_{suffix}").argtypes = [_I, _I, _P, _P, _P, _P, _P, _P]
    for name in _DROPOUT.values():
        getattr(lib, name).argtypes = [_I, _P, _P, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float]
    for suffix in ("f32", "f64"):
        getattr(lib, f"dws_forward_{suffix}").argtypes = [_I] * 6 + [_P] * 7
        getattr(lib, f"dws_backward_{suffix}").argtypes = [_I] * 6 + [_P] * 11
    return lib


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_DROPOUT = {torch.float32: "dropout_f32", torch.bfloat16: "dropout_bf16"}
_torch_ops_depth = 0  # > 0 inside `torch_ops()`


@contextmanager
def torch_ops() -> Iterator[None]:
    """Within the block the cell, dropout and the DWS map layer run as torch ops even where the kernels are built.

    For comparing the two paths (`rnnrep bench lstm`, the tests); not thread-safe.
    """
    global _torch_ops_depth
    _torch_ops_depth += 1
    try:
        yield
    finally:
        _torch_ops_depth -= 1


def _pair(t: Tensor, name: str):
    """The C functions `{name}_forward_*` and `{name}_backward_*` for `t`'s dtype, or None."""
    if _torch_ops_depth or t.device.type != "cpu" or t.dtype not in _SUFFIX:
        return None
    lib = library()
    if lib is None:
        return None
    s = _SUFFIX[t.dtype]
    return getattr(lib, f"{name}_forward_{s}"), getattr(lib, f"{name}_backward_{s}")


def kernels(t: Tensor):
    """`(forward, backward)` of the LSTM cell for `t`'s dtype, or None where the kernel does not apply."""
    return _pair(t, "cell")


def dws_kernels(t: Tensor):
    """`(forward, backward)` of the DWS map layer (`_dws.c`) for `t`'s dtype, or None."""
    return _pair(t, "dws")


def dropout_kernel(t: Tensor):
    """The C dropout function for `t` (CPU float32 or bfloat16), or None where it does not apply."""
    if _torch_ops_depth or t.device.type != "cpu" or t.dtype not in _DROPOUT:
        return None
    lib = library()
    return None if lib is None else getattr(lib, _DROPOUT[t.dtype])
