"""benchmarks/probe_stages.py: its copies of the select kernel, with parts taken out, still follow
kernels/select.py (under TRITON_INTERPRET=1); the timing itself runs on a GPU only."""

from pathlib import Path

import pytest
import torch

from kernels.common import tile_descriptors
from kernels.select import select_blocks
from nsa_core import reference as ref

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def probe(import_script):
    return import_script(BENCHMARKS / "probe_stages.py")


def test_every_select_copy_compiles_runs_and_the_whole_one_is_the_kernel(probe, tmp_path):
    variants = probe.select_variants()
    assert len(set(variants.values())) == len(variants) == 5  # each copy takes out one more part
    torch.manual_seed(0)
    q, k_cmp, v_cmp = torch.randn(1, 200, 8, 16), torch.randn(1, 11, 2, 16), torch.randn(1, 11, 2, 8)
    _, lse = ref.compressed_attention(q, k_cmp, v_cmp, cmp_block=32, cmp_stride=16)
    args = {"cmp_block": 32, "cmp_stride": 16, "slc_block": 64, "top_n": 2}
    expected = select_blocks(q, k_cmp, lse, **args)
    for i, (label, source) in enumerate(variants.items()):
        module = probe.load_module(source, f"select_variant_{i}", tmp_path)
        idx = module.select_blocks(q, k_cmp, lse, **args)
        assert idx.shape == expected.shape, label
        if label == "whole":
            assert torch.equal(idx, expected)


def test_a_select_kernel_that_changed_stops_the_probe(probe, monkeypatch):
    monkeypatch.setattr(probe, "SELECT_SOURCE", probe.SELECT_SOURCE.replace(probe.CARRY, ""))
    with pytest.raises(SystemExit, match="no longer in kernels/select.py"):
        probe.select_variants()


@pytest.mark.parametrize("descriptors", [False, True])
def test_the_gather_kernel_reads_every_selected_tile(probe, descriptors):
    """Its one output, the max over the K and V tiles of the selected blocks, is the last position of the
    latest block when one of K, V holds each key's position and the other -1: a tile read one row off, or
    a wrong block, changes it. Through pointer loads or tensor descriptors."""
    T, H, D, block, n = 256, 2, 16, 64, 3
    torch.manual_seed(0)
    ids = torch.randint(0, T // block, (1, T, H, n), dtype=torch.int32)
    ids[..., -1] = -1  # an empty slot reads zeros
    positions = torch.arange(T, dtype=torch.float32)[None, :, None, None].expand(1, T, H, D).contiguous()
    minus_one = torch.full((1, T, H, D), -1.0)
    for k, v in ((positions, minus_one), (minus_one, positions)):
        out = torch.empty(T, H, D)
        kd_vd = tile_descriptors(block, k, v) if descriptors else (k, v)
        probe._gather_kernel[(T, H)](ids, k, v, *kd_vd, out, k.stride(1), v.stride(1), ids.stride(1), H,
                                     SLC_BLOCK=block, TOP_N=n, D=D, TMA=descriptors)
        last = (ids[0].long() * block + block - 1).where(ids[0] >= 0, 0).amax(-1)  # [T, H]
        assert torch.equal(out, last[..., None].expand(T, H, D).float())
