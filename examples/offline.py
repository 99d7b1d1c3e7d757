# SPDX-License-Identifier: Apache-2.0
"""Offline ``LLM(...)`` with kv-offload: a long prompt evicted from vLLM's cache comes back from the pool.

    .venv/bin/python examples/offline.py [MODEL_DIR]

Without MODEL_DIR it builds the small random-weight test model. vLLM's own KV cache is
kept tiny here (8 MiB) so that the first document is evicted by the time it is asked about
again; ``num_cached_tokens`` then shows the prefix served from kv-offload's pool.
"""

from __future__ import annotations

import random
import sys

from vllm import LLM, SamplingParams
from vllm.config import KVTransferConfig
from vllm.inputs import TokensPrompt


def main() -> None:
    if len(sys.argv) > 1:
        model = sys.argv[1]
    else:
        from kv_offload.testing.tiny_model import build_tiny_llama

        model = str(build_tiny_llama(".cache/models/tiny"))
    llm = LLM(
        model=model, dtype="float32", max_model_len=1024, enforce_eager=True,
        kv_cache_memory_bytes=8 << 20,  # vLLM's own cache: 16 blocks of 128 tokens
        kv_transfer_config=KVTransferConfig(
            kv_connector="KVOffloadConnector", kv_connector_module_path="kv_offload.vllm",
            kv_role="kv_both", kv_connector_extra_config={"cpu_bytes": "256MiB"},
        ),
    )  # fmt: skip
    rng = random.Random(0)
    docs = [[rng.randrange(3, 2000) for _ in range(700)] for _ in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    for turn in range(2):
        for i, doc in enumerate(docs):
            (out,) = llm.generate([TokensPrompt(prompt_token_ids=doc + [10 + turn])], params, use_tqdm=False)
            print(f"turn {turn} doc {i}: {out.num_cached_tokens:4d} of {len(doc) + 1} prompt tokens cached,"
                  f" output {list(out.outputs[0].token_ids)}")  # fmt: skip


if __name__ == "__main__":  # vLLM's CPU platform starts worker processes with spawn
    main()
