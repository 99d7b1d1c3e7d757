# SPDX-License-Identifier: Apache-2.0
"""Builds kv_offload._C against the torch installed in the build environment.

Install with ``pip install --no-build-isolation -e .`` so the extension links the torch that
your vLLM brought (a build-isolated install would compile against another torch).
No ``-march=native``: the library runs on any x86-64 (or aarch64) CPU.

The CPU-attention kernels (``csrc/kernels/attn_<isa>.cpp``) are compiled once per instruction
set with that set's flags and linked into the same ``_C``; ``csrc/kernels/dispatch.cpp``
(baseline flags) picks one at run time from CPUID. A path the compiler cannot build (e.g.
AVX-512 on an old compiler) is left out with a warning; the scalar path is always built.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

from setuptools import setup
from setuptools.errors import CompileError
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
COMMON_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden"]

# Per-ISA kernel TUs and their flags, by machine architecture.
_AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
_X86_ISAS = {
    "avx512bf16": _AVX512_FLAGS + ["-mavx512bf16"],
    "avx512": _AVX512_FLAGS,
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}
_ARM_ISAS: dict[str, list[str]] = {"neon": []}


def _isa_flags() -> dict[str, list[str]]:
    machine = platform.machine().lower()
    isas: dict[str, list[str]] = {}
    if machine in ("x86_64", "amd64", "i686", "i386"):
        isas.update(_X86_ISAS)
    elif machine in ("aarch64", "arm64"):
        isas.update(_ARM_ISAS)
    isas["scalar"] = []
    return isas


def _sources() -> list[str]:
    return sorted(glob.glob(os.path.join("csrc", "ops", "*.cpp"))) + [os.path.join("csrc", "kernels", "dispatch.cpp")]


class BuildWithISAs(BuildExtension):
    """Compiles each csrc/kernels/attn_<isa>.cpp with its own flags, then links them into _C."""

    def build_extension(self, ext):  # type: ignore[no-untyped-def]
        objects: list[str] = []
        macros: list[tuple[str, str | None]] = []
        for isa, flags in _isa_flags().items():
            src = os.path.join("csrc", "kernels", f"attn_{isa}.cpp")
            try:
                objects += self.compiler.compile(
                    [src],
                    output_dir=self.build_temp,
                    include_dirs=[os.path.join(ROOT, "csrc")],
                    extra_postargs=COMMON_FLAGS + flags,
                )
            except CompileError as exc:
                if isa == "scalar":
                    raise
                print(f"warning: kv_offload: cannot compile the {isa} kernels ({exc}); that path is left out",
                      file=sys.stderr)
                continue
            macros.append((f"KVO_HAVE_{isa.upper()}", None))
        ext.extra_objects = list(ext.extra_objects or []) + objects
        ext.define_macros = list(ext.define_macros or []) + macros
        super().build_extension(ext)


ext = CppExtension(
    name="kv_offload._C",
    sources=_sources(),
    # The per-ISA kernel TUs are linked as extra objects, which setuptools' up-to-date check
    # does not look at: list every kernel file so an edit there relinks _C.
    depends=sorted(glob.glob(os.path.join("csrc", "kernels", "*"))),
    include_dirs=[os.path.join(ROOT, "csrc")],
    # at::parallel_for is inline in torch's headers (OpenMP backend): without -fopenmp its
    # `#pragma omp parallel` is dropped and every op runs on one thread. The GOMP symbols
    # resolve at load time to the libgomp torch already loaded (not linked here, so the two
    # never disagree about the thread pool).
    extra_compile_args=COMMON_FLAGS + (["-fopenmp"] if platform.system() == "Linux" else []),
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildWithISAs.with_options(use_ninja=False)})
