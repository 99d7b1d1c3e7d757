# SPDX-License-Identifier: Apache-2.0
"""CUDA helpers behind one lazily imported module (cuda-python is only touched with a GPU)."""
