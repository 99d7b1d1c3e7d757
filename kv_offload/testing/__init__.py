# SPDX-License-Identifier: Apache-2.0
"""Helpers for tests and demos: an offline tiny model, fault injection, accounting checks.

Nothing here is needed to run kv-offload in production; the modules import their heavy
dependencies (transformers, tokenizers, vLLM) lazily.
"""
