# SPDX-License-Identifier: Apache-2.0
"""Converting blocks between page formats, dtypes and block sizes (producer -> consumer)."""

from __future__ import annotations

import pytest
import torch

from kv_offload.attention.convert import convert_tokens, cuda_flash_attention_geometry
from kv_offload.attention.reference import gather_tokens, write_tokens
from kv_offload.geometry import KVGeometry, PageFormat


def _cache(g: KVGeometry, blocks: int, gen: torch.Generator) -> torch.Tensor:
    """Finite random values of the geometry's dtype everywhere (so untouched tokens are checkable)."""
    values = torch.randn(blocks, g.slot_bytes // g.element_size, generator=gen).to(g.dtype)
    return values.view(torch.uint8)


@pytest.mark.parametrize("src_fmt", [PageFormat.NHD, PageFormat.HND, PageFormat.CPU], ids=lambda f: f.value)
@pytest.mark.parametrize("dst_fmt", [PageFormat.CPU, PageFormat.HND], ids=lambda f: f.value)
@pytest.mark.parametrize("sizes", [(16, 128), (128, 32), (48, 32)], ids=str)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                    (torch.float32, torch.float32)], ids=str)  # fmt: skip
def test_convert_matches_reference(src_fmt: PageFormat, dst_fmt: PageFormat, sizes: tuple[int, int],
                                   dtypes: tuple[torch.dtype, torch.dtype]) -> None:  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    h, d, n = 2, 32, 300
    src = KVGeometry(num_layers=2, num_kv_heads=h, head_size=d, block_size=sizes[0], dtype=dtypes[0],
                     page_format=src_fmt)  # fmt: skip
    dst = KVGeometry(num_layers=3, num_kv_heads=h, head_size=d, block_size=sizes[1], dtype=dtypes[1],
                     page_format=dst_fmt)  # fmt: skip
    src_blocks = torch.randperm(40, generator=gen)[: -(-n // sizes[0])].tolist()
    dst_blocks = torch.randperm(40, generator=gen)[: -(-n // sizes[1])].tolist()
    src_cache, dst_cache = _cache(src, 40, gen), _cache(dst, 40, gen)
    k = torch.randn(h, n, d, generator=gen).to(dtypes[0])
    v = torch.randn(h, n, d, generator=gen).to(dtypes[0])
    write_tokens(src_cache, src_blocks, k, v, src, 1)
    before = gather_tokens(dst_cache, dst_blocks, n, dst, 2)
    start, stop = 37, 290  # a range that starts and ends inside blocks of both sides
    convert_tokens(src_cache, src, 1, src_blocks, dst_cache, dst, 2, dst_blocks, start, stop)
    kd, vd = gather_tokens(dst_cache, dst_blocks, n, dst, 2)
    expect_k, expect_v = before[0].clone(), before[1].clone()
    expect_k[:, start:stop] = k[:, start:stop].to(dtypes[1]).float()
    expect_v[:, start:stop] = v[:, start:stop].to(dtypes[1]).float()
    assert torch.equal(kd, expect_k) and torch.equal(vd, expect_v)


def test_cuda_flash_attention_geometry() -> None:
    g = cuda_flash_attention_geometry(4, 8, 128)
    assert (g.page_format, g.block_size, g.dtype) == (PageFormat.NHD, 16, torch.bfloat16)
    # NHD page of one layer: [N=16][H=8][K(128) | V(128)]
    assert g.k_strides().token == 8 * 256 and g.k_strides().head == 256 and g.v_strides().offset == 128
    assert cuda_flash_attention_geometry(4, 8, 128, layout="LBHNC").page_format is PageFormat.HND
    with pytest.raises(ValueError, match="multiples of 16"):
        cuda_flash_attention_geometry(4, 8, 128, block_size=24)


def test_convert_errors() -> None:
    a = KVGeometry(num_layers=1, num_kv_heads=2, head_size=32, block_size=16, dtype=torch.float32)
    b = KVGeometry(num_layers=1, num_kv_heads=4, head_size=32, block_size=16, dtype=torch.float32)
    cache = torch.zeros(4, a.slot_bytes * 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="num_kv_heads"):
        convert_tokens(cache, a, 0, [0], cache, b, 0, [1], 0, 16)
    with pytest.raises(ValueError, match="need"):
        convert_tokens(cache, a, 0, [0], cache, a, 0, [1, 2], 0, 17)
