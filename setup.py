# SPDX-License-Identifier: Apache-2.0
"""Builds kv_offload._C against the torch installed in the build environment.

Install with ``pip install --no-build-isolation -e .`` so the extension links the torch that
your vLLM brought (a build-isolated install would compile against another torch).
No ``-march=native``: the library runs on any x86-64 (or aarch64) CPU.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources() -> list[str]:
    return sorted(glob.glob(os.path.join("csrc", "ops", "*.cpp")))


ext = CppExtension(
    name="kv_offload._C",
    sources=_sources(),
    include_dirs=[os.path.join(ROOT, "csrc")],
    extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)})
