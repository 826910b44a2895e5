"""Native CPU kernels for XLA (jax.ffi), compiled from source on first use and cached per machine.

`quant_matmul.cc` holds the weight-only quantized (and plain bfloat16 and float32) matmuls of
`jaxlm.ops.quant`. XLA:CPU cannot fuse a dequantization into its dot (it writes the whole f32 weight first,
which costs more than reading an f32 weight), so these kernels are what make int8 and NF4 weights faster than
f32 on CPU. `paged_attention.cc` is decode-time attention read in place from the paged KV pool
(`jaxlm.ops.paged_attention`), where XLA would gather each row's blocks into a copy first. `token_logprobs.cc`
is the log-probabilities and top-k of a scoring step (`jaxlm.ops.sampling.token_logprobs`) in one call, where
XLA ran three passes and a copy of the logits. They are built with the system C++ compiler (`$CXX`, else
`c++`) for this CPU (`-march=native`) into `$JAXLM_CACHE/kernels` (default `~/.cache/jaxlm`), once per
source, jaxlib and CPU. Without a compiler, or with `JAXLM_KERNELS=0`, `available()` is False and the ops
compute the same values with XLA's own ops, only slower (GPUs always take that path: XLA's GPU compiler fuses
the dequantization into the matmul itself). All sources build into one library.
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

import jax
import jaxlib

SOURCES = tuple(Path(__file__).with_name(n) for n in ("quant_matmul.cc", "paged_attention.cc", "token_logprobs.cc"))
HEADERS = (Path(__file__).with_name("parallel.h"),)
# -fopenmp-simd: `#pragma omp simd` vectorises float reductions (no OpenMP runtime is linked)
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w")
TARGETS = (
    "jaxlm_paged_attention",
    "jaxlm_int8_matmul",
    "jaxlm_nf4_matmul",
    "jaxlm_bf16_matmul",
    "jaxlm_f32_matmul",
    "jaxlm_token_logprobs",
)


def cache_dir() -> Path:
    return Path(os.environ.get("JAXLM_CACHE", Path.home() / ".cache" / "jaxlm")) / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> Path:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise OSError("no C++ compiler found (set $CXX)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256(
        "\n".join(
            [
                *(f.read_text() for f in SOURCES + HEADERS),
                jaxlib.__version__,
                compiler,
                platform.machine(),
                _cpu_flags(),
                *FLAGS,
            ]
        ).encode()
    ).hexdigest()[:16]
    out = cache_dir() / f"jaxlm_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, then renamed: concurrent builds are safe
        part = Path(tmp) / out.name
        cmd = [compiler, *FLAGS, f"-I{include}"]
        subprocess.run([*cmd, *map(str, SOURCES), "-o", str(part)], check=True, capture_output=True, text=True)
        os.replace(part, out)
    return out


@functools.cache
def available() -> bool:
    """True when the kernels are built and registered as XLA:CPU custom calls (once per process)."""
    if os.environ.get("JAXLM_KERNELS", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(
            f"jaxlm: native CPU kernels unavailable, quantized matmuls use XLA ops: {detail[:500]}", stacklevel=2
        )
        return False
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return True


def cpu_or(kernel, xla, *args):
    """kernel(*args) where it is lowered for the CPU and the kernels are built; xla(*args) elsewhere (a GPU,
    no compiler, `JAXLM_KERNELS=0`)."""
    if not available():
        return xla(*args)
    return jax.lax.platform_dependent(*args, cpu=kernel, default=xla)
