"""Where the time of select and of the selected stage goes, on one GPU.

    python benchmarks/probe_stages.py [--length 65536] [--shapes paper128 small]

Select: the kernel of kernels/select.py timed whole and as copies with parts taken out one after the
other (cumulatively): the top-n merge (replaced by one max per tile, so that the scores stay live), the
carry into the next tile, the Eq. 9 remap product (replaced by a row sum), and the exponentials, which
leaves the loads and the QK product. The copies choose wrong blocks; only their times mean anything.

Selected: the group and block paths over all 16 slots, and a kernel that only gathers the K and V
tiles the group path reads (one program per query and KV head, the same block ids, no arithmetic but
an elementwise max), once with the real ids and once with every id below 64 (4k keys, which stay in
L2), each through pointer loads and through tensor descriptors: the rate at which one query's blocks
can be fetched at all, the floor of a group-centric kernel.

Random bfloat16 inputs as in bench_attention.py; medians of triton.testing.do_bench. Prints a table
and writes benchmarks/results/<card>-<date>-probe.json, one record per timing with stage "probe:select",
"probe:selected" or "probe:gather" (the app lists these in its table and leaves them out of its charts).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_attention import GEOMETRY, SHAPES, bench, card_slug  # noqa: E402

from kernels.common import query_starts, tile_descriptors  # noqa: E402
from kernels.interval_attention import MODE_CMP, interval_attention  # noqa: E402
from kernels.selected import run_selected  # noqa: E402

SELECT_SOURCE = (ROOT / "kernels" / "select.py").read_text()
MERGE_START = "        weakest = tl.min(top, 1)\n        rounds ="
MERGE_END = "            cand = tl.where(cand == best[:, None], NONE, cand)\n"
CARRY = "            carry = tl.sum(tl.reshape(tl.sum(p * w_next[None, :], 1), [BT, GP]), 1)\n"
REMAP = "x = tl.dot(p.to(tl.float16), w.to(tl.float16))"
EXPONENTIALS = (("p = tl.exp2(s - lse_dead_inf[:, None])", "p = s - lse_dead_inf[:, None]"),
                ("tl.exp2(s - lse[:, None])", "(s - lse[:, None])"))


def _cut(source: str, old: str, new: str) -> str:
    if old not in source:  # kernels/select.py changed: this probe must follow it
        raise SystemExit(f"probe_stages: {old.strip()[:60]!r} is no longer in kernels/select.py")
    return source.replace(old, new)


def select_variants() -> dict[str, str]:
    """Source of kernels/select.py with parts taken out cumulatively, by label."""
    base = SELECT_SOURCE.replace("from .common import", "from kernels.common import")
    start = base.index(MERGE_START)
    end = base.index(MERGE_END) + len(MERGE_END)
    no_merge = base[:start] + "        top = tl.maximum(top, tl.max(cand, 1)[:, None])\n" + base[end:]
    no_carry = _cut(no_merge, CARRY, "")
    no_remap = _cut(no_carry, REMAP, "x = tl.broadcast_to(tl.sum(p, 1)[:, None], [R, NB])")
    loads_and_qk = no_remap
    for old, new in EXPONENTIALS:
        loads_and_qk = _cut(loads_and_qk, old, new)
    return {"whole": base, "- merge": no_merge, "- merge, carry": no_carry, "- merge, carry, remap": no_remap,
            "loads + QK only": loads_and_qk}


def load_module(source: str, name: str, folder: Path):
    """Import source as a module from a file (Triton reads a kernel's source from its file)."""
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@triton.jit
def _gather_kernel(IDX, K, V, KD, VD, OUT, skt, svt, sit, H, SLC_BLOCK: tl.constexpr, TOP_N: tl.constexpr,
                   D: tl.constexpr, TMA: tl.constexpr):
    """For query t and KV head h, load the K and V tiles of its TOP_N blocks; keep only an elementwise max.

    TMA: the tiles come through the tensor descriptors KD and VD (as the group path loads them) instead of
    pointer loads; an empty slot's negative start reads zeros either way."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    offs = tl.arange(0, SLC_BLOCK)
    acc = tl.zeros([D, SLC_BLOCK], tl.float32)
    for slot in range(0, TOP_N):
        blk = tl.load(IDX + t.to(tl.int64) * sit + h * TOP_N + slot)
        if TMA:
            kt = tl.reshape(KD.load([0, blk * SLC_BLOCK, h, 0]), [SLC_BLOCK, D]).T
            vt = tl.reshape(VD.load([0, blk * SLC_BLOCK, h, 0]), [SLC_BLOCK, D]).T
        else:
            n = blk.to(tl.int64) * SLC_BLOCK + offs
            ok = n >= 0
            kt = tl.load(K + h * D + n[None, :] * skt + d[:, None], mask=ok[None, :], other=0.0)
            vt = tl.load(V + h * D + n[None, :] * svt + d[:, None], mask=ok[None, :], other=0.0)
        acc = tl.maximum(acc, tl.maximum(kt, vt).to(tl.float32))
    tl.store(OUT + (t * H + h) * D + d, tl.max(acc, 1))


def probe_shape(name: str, T: int, folder: Path) -> list[dict]:
    """Records {shape, T, stage "probe:...", impl, ms} (gathers also TBps) of one shape at length T."""
    HQ, H, dk, dv = SHAPES[name]
    if dk != dv:
        raise SystemExit(f"probe_stages: the gather kernel needs Dk = Dv ({name} has {dk}, {dv})")
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    l, d, l_slc, n = GEOMETRY["cmp_block"], GEOMETRY["cmp_stride"], GEOMETRY["slc_block"], GEOMETRY["top_n"]
    tc = (T - l) // d + 1
    q, k, v = randn(1, T, HQ, dk), randn(1, T, H, dk), randn(1, T, H, dv)
    k_cmp, v_cmp = randn(1, tc, H, dk), randn(1, tc, H, dv)
    pos0 = query_starts(None, 1, 0, q.device)
    scale = dk**-0.5
    _, lse = interval_attention(q, k_cmp, v_cmp, pos0, mode=MODE_CMP, scale=scale, cmp_block=l, cmp_stride=d,
                                want_lse=True)
    rows, block_idx = [], None

    def record(stage, impl, ms, **extra):
        rows.append({"shape": name, "T": T, "stage": f"probe:{stage}", "impl": impl, "ms": ms, **extra})

    for i, (label, source) in enumerate(select_variants().items()):
        module = load_module(source, f"select_variant_{i}", folder)

        def select(module=module):
            return module._select(q, k_cmp, lse, pos0, cmp_block=l, cmp_stride=d, slc_block=l_slc, top_n=n,
                                  scale=scale, init_blocks=1, local_blocks=2)

        if block_idx is None:
            block_idx = select()
        record("select", label, bench(select))
    for path in ("group", "block"):
        record("selected", f"{path} path, {n} slots", bench(
            lambda path=path: run_selected(q, k, v, block_idx, pos0, slc_block=l_slc, scale=scale, path=path)))
    out = torch.empty(T, H, dk, device="cuda", dtype=torch.bfloat16)
    gathered_gb = T * H * n * l_slc * dk * 2 * 2 / 1e9  # K and V, bfloat16
    descriptors = tile_descriptors(l_slc, k, v)
    for label, ids in (("real ids", block_idx), ("ids < 64", block_idx % 64)):
        ids = ids.contiguous()
        for loads, kd_vd in (("", (k, v)), (", descriptors", descriptors)):
            if kd_vd is None:
                continue
            ms = bench(lambda ids=ids, kd_vd=kd_vd: _gather_kernel[(T, H)](
                ids, k, v, *kd_vd, out, k.stride(1), v.stride(1), ids.stride(1), H, SLC_BLOCK=l_slc, TOP_N=n, D=dk,
                TMA=kd_vd is descriptors, num_warps=4, num_stages=3))
            record("gather", label + loads, ms, TBps=gathered_gb / ms)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--shapes", nargs="+", default=["paper128", "small"], choices=sorted(SHAPES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_stages needs a CUDA GPU")
    card = torch.cuda.get_device_name()
    results = {"card": card, "date": dt.date.today().isoformat(), "torch": torch.__version__,
               "triton": triton.__version__, "method": "triton.testing.do_bench median, random normal inputs",
               "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            results["results"] += probe_shape(name, args.length, Path(tmp))
    print(f"{card}, T = {args.length}, ms (medians)")
    for row in results["results"]:
        rate = f"  {row['TBps']:.2f} TB/s" if "TBps" in row else ""
        print(f"  {row['shape']:9s} {row['stage']:15s} {row['impl']:25s} {row['ms']:8.3f}{rate}")
    out = ROOT / "benchmarks" / "results" / f"{card_slug(card)}-{results['date']}-probe.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
