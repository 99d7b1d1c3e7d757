# SPDX-License-Identifier: Apache-2.0
"""Random-weight models with particular attention features, built offline (tests, benchmarks).

:func:`build_model` writes a Hugging Face checkpoint of architecture ``arch`` with random
weights and the tokenizer of :func:`kv_offload.testing.tiny_model.build_tiny_llama`:

* ``"llama"``: GQA Llama; ``layer_types`` / ``sliding_window`` give sliding-window layers;
  ``head_dim`` may differ from ``hidden_size / num_heads`` (the serving benchmark's
  attention-heavy shape: 32 query heads, 8 KV heads, head size 128 on a narrow hidden size).
* ``"bloom"``: ALiBi attention (a feature kv-offload's kernels do not have).

    python -m kv_offload.testing.attention_models OUT_DIR --arch llama --set num_hidden_layers=2
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from kv_offload.testing.tiny_model import build_tiny_llama

__all__ = ["ARCHS", "build_model", "serving_bench_config"]

_STAMP = "kv_offload_attention_model.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

#: Defaults per architecture (tiny: engines start in seconds).
ARCHS: dict[str, dict[str, Any]] = {
    "llama": dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
    ),  # fmt: skip
    "bloom": dict(hidden_size=256, n_layer=2, n_head=4),
}


def serving_bench_config(num_layers: int = 2, max_len: int = 20480) -> dict[str, Any]:
    """The attention-heavy Llama of ``benchmarks/bench_cpu_serving.py``: GQA 32/8, head size 128."""
    return dict(
        hidden_size=1024, head_dim=128, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=1024, num_hidden_layers=num_layers, max_position_embeddings=max_len,
        tie_word_embeddings=False,
    )  # fmt: skip


def build_model(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    dtype: str = "float32",
    init_std: float = 0.1,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Write a random-weight ``arch`` model + tokenizer to ``out_dir`` (reused if the recipe matches).

    ``overrides`` are config fields (e.g. ``num_hidden_layers=2``, ``sliding_window=96``,
    ``layer_types=[...]``). Needs ``transformers`` and ``tokenizers``.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    out = Path(out_dir)
    fields = {**ARCHS[arch], **overrides}
    recipe = {"arch": arch, "fields": fields, "dtype": dtype, "init_std": init_std, "seed": seed}
    stamp = out / _STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = build_tiny_llama(out.parent / f".{out.name}-tokenizer")
    for name in _TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, out / name)
    special = json.loads((tok_dir / "config.json").read_text())

    import torch
    import transformers

    ids = {k: special[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    config: Any
    model_cls: Any
    if arch == "llama":
        config = transformers.LlamaConfig(initializer_range=init_std, dtype=dtype, **ids, **fields)
        model_cls = transformers.LlamaForCausalLM
    else:
        config = transformers.BloomConfig(initializer_range=init_std, dtype=dtype, **ids, **fields)
        model_cls = transformers.BloomForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config).to(getattr(torch, dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    stamp.write_text(json.dumps(recipe))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--init-std", type=float, default=0.1)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="config field")
    args = parser.parse_args(argv)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    print(build_model(args.out_dir, args.arch, dtype=args.dtype, init_std=args.init_std, **overrides))


if __name__ == "__main__":
    main()
