# SPDX-License-Identifier: Apache-2.0
"""Build a random-weight Llama model and a byte-level BPE tokenizer, offline.

There is no model hub on the machines kv-offload is tested on, so tests and the demo build
their model here: a ``LlamaForCausalLM`` with random weights plus a tokenizer trained on
generated sentences, saved with ``save_pretrained`` into a directory vLLM loads like any
Hugging Face checkpoint. fp32 with ``initializer_range`` 0.1 gives varied greedy output, so
a wrong KV block changes the generated tokens (equality tests rely on that).

    python -m kv_offload.testing.tiny_model OUT_DIR [--size tiny|demo]
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["ModelSize", "SIZES", "build_tiny_llama"]

_STAMP = "kv_offload_tiny_model.json"
_WORDS = (
    "the a one every some cache block memory host device layer token prefix request model "
    "engine pool store load evict offload page slot key value head batch step queue river "
    "mountain city garden winter summer ocean forest stone light shadow signal number letter "
    "quickly slowly carefully brightly quietly never always often sometimes today tomorrow "
    "runs keeps moves brings finds writes reads holds opens closes turns grows sends takes "
    "red green blue small large old new warm cold long short early late first last next"
).split()


@dataclass(frozen=True)
class ModelSize:
    """Shape of the generated model (Llama architecture)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int


SIZES: dict[str, ModelSize] = {
    # 3 M parameters: start-up in seconds; for tests.
    "tiny": ModelSize(4, 256, 4, 2, 512, 4096),
    # ~21 M parameters: a 2000-token prefill costs about a second on 2 cores; for the demo.
    "demo": ModelSize(6, 512, 8, 4, 1536, 8192),
}


def _corpus(n_sentences: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        out.append(" ".join(words).capitalize() + rng.choice(".!?"))
    return out


def build_tiny_llama(
    out_dir: str | Path,
    *,
    size: str = "tiny",
    dtype: str = "float32",
    init_std: float = 0.1,
    vocab_size: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a model + tokenizer to ``out_dir`` (skipped if one with the same recipe is there).

    Returns the directory. Needs ``transformers`` and ``tokenizers`` (the ``model`` extra).
    """
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {sorted(SIZES)}")
    out = Path(out_dir)
    recipe = {"size": size, "shape": asdict(SIZES[size]), "dtype": dtype, "init_std": init_std,
              "vocab_size": vocab_size, "seed": seed}  # fmt: skip
    stamp = out / _STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return out
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    import transformers

    llama_config: Any = transformers.LlamaConfig
    llama_model: Any = transformers.LlamaForCausalLM
    tokenizer_fast: Any = transformers.PreTrainedTokenizerFast

    special = ["<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(4000, seed), trainer=trainer)
    fast = tokenizer_fast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out))

    shape = SIZES[size]
    config = llama_config(
        vocab_size=len(fast),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        initializer_range=init_std,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        dtype=dtype,
    )
    torch.manual_seed(seed)
    model = llama_model(config).to(getattr(torch, dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    stamp.write_text(json.dumps(recipe))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--init-std", type=float, default=0.1)
    args = parser.parse_args(argv)
    path = build_tiny_llama(args.out_dir, size=args.size, dtype=args.dtype, init_std=args.init_std)
    print(path)


if __name__ == "__main__":
    main()
