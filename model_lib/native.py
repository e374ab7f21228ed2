"""Small C kernels, built with the system's C compiler on first use and loaded through ctypes.

Why C and not a PyTorch extension: the kernels are a few dozen lines each, need no headers
but libc's, and a build takes ~1 s with the compiler every Debian image has; where there is
none (or ``TRACE_NATIVE_KERNELS=0``), ``build`` returns None and each caller runs its PyTorch
(or numpy) reference instead, with the same math.

Flags: vector instructions as torch detected them on this CPU (AVX-512: 16 floats per
instruction; AVX2: 8), ``-ffast-math`` at *compile* time only: linking a shared library with it
adds a constructor that sets flush-to-zero for the whole process (GCC < 13; check with
``nm lib.so | grep set_fast_math``).

A library lands in the user's cache (``$XDG_CACHE_HOME`` or ``~/.cache``, ``trace_dagster/kernels``;
or ``TRACE_KERNEL_CACHE``), named by a hash of its source, compiler and flags, so that a cache
shared by different CPUs keeps one build per instruction set; it is written under a temporary
name, then renamed: concurrent processes never load a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def flags() -> list[str]:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):  # torch's AVX512 level: F, BW, VL and DQ
        arch = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mprefer-vector-width=512"]
    elif capability == "AVX2":
        arch = ["-mavx2", "-mfma"]
    else:
        arch = []
    return ["-O3", "-ffast-math", "-fopenmp-simd", "-fPIC", *arch]


def build(name: str, source: str) -> ctypes.CDLL | None:
    """The library built from C ``source`` (cached), or None: no C compiler, a failed build, or
    ``TRACE_NATIVE_KERNELS=0``. Callers cache the result and declare the argument types."""
    if os.environ.get("TRACE_NATIVE_KERNELS", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        log.info("no C compiler: %s runs on its PyTorch/numpy reference", name)
        return None
    compile_flags = flags()
    digest = hashlib.sha256("\0".join([source, cc, *compile_flags]).encode()).hexdigest()[:16]
    # the user's own cache, not a shared /tmp where another account could plant a library by that name
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = Path(os.environ.get("TRACE_KERNEL_CACHE") or cache_home / "trace_dagster" / "kernels")
    library = folder / f"{name}-{digest}.so"
    try:
        if not library.exists():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src, obj, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.o", Path(tmp) / f"{name}.so"
                src.write_text(source)
                subprocess.run([cc, *compile_flags, "-c", str(src), "-o", str(obj)], check=True, capture_output=True)
                subprocess.run([cc, "-shared", "-o", str(out), str(obj), "-lm"], check=True, capture_output=True)
                os.replace(out, library)
        return ctypes.CDLL(str(library))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("%s not built (%s): it runs on its PyTorch/numpy reference", name, e)
        return None


__all__ = ["build", "flags"]
