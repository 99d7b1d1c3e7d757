# SPDX-License-Identifier: Apache-2.0
"""KV geometry: byte math and where K and V lie in each page format."""

from __future__ import annotations

import pytest
import torch

from kv_offload.geometry import KVGeometry, PageFormat, TensorStrides


def test_llama3_8b_sizes() -> None:
    g = KVGeometry(num_layers=32, num_kv_heads=8, head_size=128, block_size=16, dtype=torch.bfloat16)
    assert g.page_bytes == 64 << 10
    assert g.block_bytes == 2 << 20 and g.slot_bytes == 2 << 20
    assert g.page_offset(31) == 31 * (64 << 10)


def test_slot_is_padded_to_4k() -> None:
    g = KVGeometry(num_layers=3, num_kv_heads=1, head_size=40, block_size=16, dtype=torch.float16)
    assert g.block_bytes == 3 * 16 * 80 * 2 and g.slot_bytes == 8192


def gather(page: torch.Tensor, s: TensorStrides, h: int, n: int, d: int) -> torch.Tensor:
    return page.as_strided((h, n, d), (s.head, s.token, s.dim), s.offset)


@pytest.mark.parametrize("fmt", [PageFormat.HND, PageFormat.NHD, PageFormat.CPU])
def test_strides_address_every_element_once(fmt: PageFormat) -> None:
    g = KVGeometry(num_layers=1, num_kv_heads=3, head_size=8, block_size=4, dtype=torch.float32,
                   page_format=fmt, head_size_v=6)  # fmt: skip
    page = torch.arange(g.page_elements, dtype=torch.float32)
    k = gather(page, g.k_strides(), 3, 4, 8)
    v = gather(page, g.v_strides(), 3, 4, 6)
    both = torch.cat([k.reshape(-1), v.reshape(-1)])
    assert both.unique().numel() == g.page_elements  # K and V tile the page exactly


def test_formats_match_their_definitions() -> None:
    h, n, d = 2, 4, 8
    k = torch.randn(h, n, d)
    v = torch.randn(h, n, d)
    pages = {
        PageFormat.HND: torch.cat([k, v], -1).reshape(-1),
        PageFormat.NHD: torch.cat([k, v], -1).transpose(0, 1).reshape(-1),
        PageFormat.CPU: torch.cat([k.transpose(1, 2).reshape(h, -1), v.reshape(h, -1)], -1).reshape(-1),
    }
    for fmt, page in pages.items():
        g = KVGeometry(num_layers=1, num_kv_heads=h, head_size=d, block_size=n, dtype=torch.float32, page_format=fmt)
        assert torch.equal(gather(page, g.k_strides(), h, n, d), k), fmt
        assert torch.equal(gather(page, g.v_strides(), h, n, d), v), fmt


def test_latent_format_has_one_vector_per_token() -> None:
    g = KVGeometry(num_layers=2, num_kv_heads=1, head_size=576, block_size=64, dtype=torch.bfloat16,
                   page_format=PageFormat.LATENT)  # fmt: skip
    assert g.page_bytes == 64 * 576 * 2
    assert g.v_strides() == g.k_strides()
    with pytest.raises(ValueError, match="num_kv_heads must be 1"):
        KVGeometry(num_layers=1, num_kv_heads=2, head_size=8, block_size=4, dtype=torch.float32,
                   page_format=PageFormat.LATENT)  # fmt: skip


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_size", "block_size"])
def test_bad_sizes_name_the_field(field: str) -> None:
    args = dict(num_layers=1, num_kv_heads=1, head_size=8, block_size=4)
    args[field] = 0
    with pytest.raises(ValueError, match=f"KVGeometry.{field} must be a positive int"):
        KVGeometry(dtype=torch.float32, **args)


def test_description_round_trips() -> None:
    g = KVGeometry(num_layers=4, num_kv_heads=2, head_size=64, block_size=128, dtype=torch.bfloat16,
                   page_format=PageFormat.CPU)  # fmt: skip
    assert KVGeometry.from_description(g.describe()) == g
