"""NSA forward on the Triton kernels, per stage and whole, against dense attention and fla-core, on one GPU.

    python benchmarks/bench_attention.py [--lengths 8192 16384 32768 65536] [--shapes paper128 paper192 small]
        [--tune 65536]

One process, one card, random bfloat16 inputs, medians of triton.testing.do_bench. Shapes:
paper128 (HQ=64, H=4, dim 128), paper192 (HQ=64, H=4, Dk=192, Dv=128, the paper's dims) and small
(HQ=16, H=4, G=4, dim 128); NSA geometry l=32, d=16, l'=64, n=16, w=512. Stages: cmp (compressed
attention + lse), select (scores, remap, group sum, top-n), slc (selected attention, both paths
timed), win (window alone), win+gate (window with the gated sum fused), nsa (the whole layer).
Baselines in the same run: SDPA causal under FLASH_ATTENTION and CUDNN_ATTENTION (KV expanded to
all heads), and fla-core's parallel_nsa where it allows the shape (G >= 16, power of two).

Decode (--decode-lengths, the shapes "decode-paper128" and "decode-small"): one new token for each
of B = 8 sequences whose keys, values and compressed tokens are cached, the same stages, against
dense SDPA over the cache (GQA, no KV expansion) and fla's parallel_nsa with q = the last token
(which pools its compressed keys from k and v on every call: that is its API). The whole step and
dense SDPA are also timed as CUDA-graph replays, the GPU time without the host's launch overhead.

The ceilings (device copy bandwidth, bf16 matmul rate) are measured too. Writes
benchmarks/results/<card>-<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import traceback
from pathlib import Path

import torch
import triton
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels  # noqa: E402
from kernels.common import query_starts  # noqa: E402
from kernels.interval_attention import MODE_CMP, MODE_FORCED, MODE_WIN, interval_attention  # noqa: E402
from kernels.select import _select  # noqa: E402
from kernels.selected import run_selected  # noqa: E402
from kernels.window import window_gated_sum  # noqa: E402
from nsa_core.config import NSAConfig  # noqa: E402

SHAPES = {"paper128": (64, 4, 128, 128), "paper192": (64, 4, 192, 128), "small": (16, 4, 128, 128)}
DECODE_BATCH = 8  # sequences decoding one token each, as in the decode anchors
GEOMETRY = {"cmp_block": 32, "cmp_stride": 16, "slc_block": 64, "top_n": 16, "window": 512}


def bench(fn):
    # Long calls need few repeats; do_bench's own estimate sets the count within rep milliseconds.
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def card_slug(card: str) -> str:
    """The card's name as results files spell it: "NVIDIA H200" -> "nvidia-h200"."""
    return "".join(c if c.isalnum() else "-" for c in card).strip("-").lower()


def ceilings():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    copy_ms = bench(lambda: y.copy_(x))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench(lambda: a @ b)
    return {"copy_TBps": 2 * x.numel() / copy_ms / 1e9, "matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


def cuda_graph(fn):
    """fn captured in a CUDA graph (after warm-up launches on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _recorder(shape, T, rows, errors):
    """record(stage, impl, fn): time fn and append a row; a failure (a baseline that refuses the shape) is
    reported in errors, not fatal."""
    def record(stage, impl, fn):
        try:
            ms = bench(fn)
        except Exception as err:
            errors.append(f"{shape} T={T} {stage}/{impl}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            return None
        rows.append({"shape": shape, "T": T, "stage": stage, "impl": impl, "ms": round(ms, 4)})
        return ms
    return record


def _layer_inputs(name, T, B=1, TQ=None):
    """Random bfloat16 inputs of one layer: TQ queries (all T by default) that are the last of T keys, for B
    sequences. Returns (cfg, q, k, v, k_cmp, v_cmp, gates, pos0, scale)."""
    HQ, H, dk, dv = SHAPES[name]
    TQ = T if TQ is None else TQ
    cfg = NSAConfig(n_head=HQ, n_kv_head=H, head_dim=dk, v_head_dim=dv, **GEOMETRY)
    tc = (T - cfg.cmp_block) // cfg.cmp_stride + 1

    def rnd(*shape, fill=torch.randn):
        return fill(*shape, device="cuda", dtype=torch.bfloat16)

    q = rnd(B, TQ, HQ, dk)
    gates = rnd(B, TQ, HQ, 3, fill=torch.rand)
    pos0 = query_starts(None, B, T - TQ, q.device)
    return (cfg, q, rnd(B, T, H, dk), rnd(B, T, H, dv), rnd(B, tc, H, dk), rnd(B, tc, H, dv), gates, pos0,
            dk**-0.5)


def _time_front(record, cfg, q, k, v, k_cmp, v_cmp, pos0, scale):
    """Time the compressed branch and select; return (o_cmp, block_idx, o_slc) for the later stages."""
    geo = {"cmp_block": cfg.cmp_block, "cmp_stride": cfg.cmp_stride}
    sel = {**geo, "slc_block": cfg.slc_block, "top_n": cfg.top_n, "scale": scale, "init_blocks": 1, "local_blocks": 2}
    o_cmp, lse = interval_attention(q, k_cmp, v_cmp, pos0, mode=MODE_CMP, scale=scale, want_lse=True, **geo)
    idx = _select(q, k_cmp, lse, pos0, **sel)
    o_slc = run_selected(q, k, v, idx, pos0, slc_block=cfg.slc_block, scale=scale)
    record("cmp", "triton", lambda: interval_attention(q, k_cmp, v_cmp, pos0, mode=MODE_CMP, scale=scale,
                                                       want_lse=True, **geo))
    record("select", "triton", lambda: _select(q, k_cmp, lse, pos0, **sel))
    return o_cmp, idx, o_slc


def _time_fla(record, errors, q, k, v, gates):
    """fla-core's parallel_nsa (no window) where it takes the shape: G >= 16 a power of two, Dk = Dv."""
    G = q.shape[2] // k.shape[2]
    if G < 16 or G & (G - 1) or q.shape[3] != v.shape[3]:
        return
    try:
        from fla.ops.nsa import parallel_nsa
    except ImportError as err:
        errors.append(f"fla-core not importable: {err}")
        return
    g_cmp, g_slc = gates[..., 0].contiguous(), gates[..., 1].contiguous()
    record("nsa-no-window", "fla-parallel_nsa",
           lambda: parallel_nsa(q, k, v, g_cmp, g_slc, block_counts=16, block_size=64))


def run_shape(name, T, rows, errors):
    cfg, q, k, v, k_cmp, v_cmp, gates, pos0, scale = _layer_inputs(name, T)
    G = q.shape[2] // k.shape[2]
    record = _recorder(name, T, rows, errors)

    with torch.no_grad():
        o_cmp, idx, o_slc = _time_front(record, cfg, q, k, v, k_cmp, v_cmp, pos0, scale)
        for path in ("group", "block"):
            record("slc", f"triton-{path}", lambda p=path: run_selected(q, k, v, idx, pos0, slc_block=64,
                                                                        scale=scale, path=p))

        def forced():
            return interval_attention(q, k, v, pos0, mode=MODE_FORCED, scale=scale, slc_block=64, init_blocks=1,
                                      local_blocks=2, want_lse=True)

        record("forced", "triton", forced)
        for path in ("group", "block"):
            # the selected branch with its forced blocks attended densely first (what nsa_attention runs)
            record("slc+forced", f"triton-{path}", lambda p=path: run_selected(
                q, k, v, idx, pos0, slc_block=64, scale=scale, path=p, forced=(*forced(), 1, 2)))
        record("win", "triton", lambda: kernels.window_attention(q, k, v, window=512))
        record("win+gate", "triton", lambda: window_gated_sum(q, k, v, gates, o_cmp, o_slc, pos0, window=512,
                                                              scale=scale, store_win=False))
        record("nsa", "triton", lambda: kernels.nsa_attention(q, k, v, k_cmp, v_cmp, gates, config=cfg))

        qt = q.transpose(1, 2)
        ke = k.repeat_interleave(G, 2).transpose(1, 2)
        ve = v.repeat_interleave(G, 2).transpose(1, 2)
        for backend, label in ((SDPBackend.FLASH_ATTENTION, "sdpa-flash"), (SDPBackend.CUDNN_ATTENTION, "sdpa-cudnn")):
            def dense(b=backend):
                with sdpa_kernel(b):
                    return F.scaled_dot_product_attention(qt, ke, ve, is_causal=True)
            record("dense", label, dense)
        ke = ve = None  # the dense closures are done with them: free the memory before fla runs
        _time_fla(record, errors, q, k, v, gates)


def run_decode(name, T, rows, errors):
    """One decode step: q [B, 1, HQ, D] (the token at position T - 1) over cached k, v, k_cmp, v_cmp of T keys."""
    cfg, q, k, v, k_cmp, v_cmp, gates, pos0, scale = _layer_inputs(name, T, B=DECODE_BATCH, TQ=1)
    shape = f"decode-{name}"
    record = _recorder(shape, T, rows, errors)

    with torch.no_grad():
        o_cmp, idx, o_slc = _time_front(record, cfg, q, k, v, k_cmp, v_cmp, pos0, scale)
        record("slc", "triton", lambda: run_selected(q, k, v, idx, pos0, slc_block=64, scale=scale))
        record("win+gate", "triton", lambda: window_gated_sum(q, k, v, gates, o_cmp, o_slc, pos0, window=512,
                                                              scale=scale, store_win=False))
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        def nsa():
            return kernels.nsa_attention(q, k, v, k_cmp, v_cmp, gates, config=cfg)

        def dense():
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

        record("nsa", "triton", nsa)
        record("dense", "sdpa-gqa", dense)
        # A serving loop replays a decode step as a CUDA graph: the GPU time without the host's launches.
        for stage, impl, fn in (("nsa", "triton-cuda-graph", nsa), ("dense", "sdpa-gqa-cuda-graph", dense)):
            try:
                replay = cuda_graph(fn)
            except Exception as err:
                errors.append(f"{shape} T={T} {stage}/{impl}: capture: {type(err).__name__}: {str(err)[:200]}")
            else:
                record(stage, impl, replay)
        _time_fla(record, errors, q, k, v, gates)


def tune(rows, errors, T, knobs=()):
    """Sweep the launch knobs at length T, keep the fastest of each, return the settings chosen.

    Rows carry stage "tune:<knob>" and the candidate as impl. A knob is judged on the sum of its times
    over the shapes it serves, so one setting holds for all of them. knobs: sweep only these (all if empty).
    """
    import kernels.interval_attention as ia
    import kernels.nsa as knsa
    import kernels.select as ks
    import kernels.selected as kslc

    def data(name):
        keys = ("cfg", "q", "k", "v", "kc", "vc", "gates", "pos0", "scale")
        return dict(zip(keys, _layer_inputs(name, T), strict=True))

    def cmp(x):
        return interval_attention(x["q"], x["kc"], x["vc"], x["pos0"], mode=MODE_CMP, scale=x["scale"],
                                  cmp_block=32, cmp_stride=16, want_lse=True)

    def sweep(knob, shapes, candidates, apply, fn):
        if knobs and knob not in knobs:  # not swept: keep the module's current setting
            return "unchanged"
        totals = {}
        for cand in candidates:
            apply(cand)
            total = 0.0
            for name, x in shapes:
                try:
                    ms = bench(lambda x=x: fn(x))
                except Exception as err:
                    errors.append(f"tune {knob} {cand} {name}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
                    total = float("inf")
                    break
                rows.append({"shape": name, "T": T, "stage": f"tune:{knob}", "impl": str(cand), "ms": round(ms, 4)})
                total += ms
            totals[cand] = total
        best = min(totals, key=totals.get)
        apply(best)
        return best

    chosen = {}
    shapes = {name: data(name) for name in ("paper128", "paper192", "small")}

    def set_launch(mode, kind):
        return lambda cand: ia.LAUNCH.__setitem__((mode, kind), cand)

    chosen["cmp-wide"] = sweep("cmp-wide", [("paper192", shapes["paper192"])],
                               [(64, 32, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2)],
                               set_launch(MODE_CMP, "wide"), cmp)
    chosen["cmp-narrow"] = sweep("cmp-narrow", [("paper128", shapes["paper128"]), ("small", shapes["small"])],
                                 [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 32, 8, 3),
                                  (128, 32, 8, 4)],
                                 set_launch(MODE_CMP, "narrow"), cmp)
    narrow = [("paper128", shapes["paper128"]), ("small", shapes["small"])]
    for _, x in narrow:
        x["o_cmp"], x["lse"] = cmp(x)
    short_launches = [(64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2), (128, 32, 4, 3), (128, 32, 8, 3)]
    chosen["win-narrow"] = sweep(
        "win-narrow", narrow, short_launches, set_launch(MODE_WIN, "narrow"),
        lambda x: window_gated_sum(x["q"], x["k"], x["v"], x["gates"], x["o_cmp"], x["o_cmp"], x["pos0"],
                                   window=512, scale=x["scale"], store_win=False))
    chosen["forced-narrow"] = sweep(
        "forced-narrow", narrow, short_launches, set_launch(MODE_FORCED, "narrow"),
        lambda x: interval_attention(x["q"], x["k"], x["v"], x["pos0"], mode=MODE_FORCED, scale=x["scale"],
                                     slc_block=64, init_blocks=1, local_blocks=2, want_lse=True))

    def select(x):
        return _select(x["q"], x["kc"], x["lse"], x["pos0"], cmp_block=32, cmp_stride=16, slc_block=64, top_n=16,
                       scale=x["scale"], init_blocks=1, local_blocks=2)

    chosen["cmp-split"] = sweep("cmp-split", narrow + [("paper192", shapes["paper192"])], [True, False],
                                lambda f: setattr(ia, "SPLIT_MASK", f), cmp)
    chosen["select-remap"] = sweep("select-remap", narrow, [True, False],
                                   lambda f: setattr(ks, "REMAP_FIRST", f), select)
    chosen["select-split"] = sweep("select-split", narrow, [True, False],
                                   lambda f: setattr(ks, "SPLIT_MASK", f), select)
    chosen["select-launch"] = sweep("select-launch", narrow,
                                    [(64, 4, 3), (128, 8, 3), (128, 4, 3), (64, 8, 3), (32, 4, 3), (32, 2, 3)],
                                    lambda c: setattr(ks, "SELECT_LAUNCH", c), select)
    chosen["select-fill-first"] = sweep("select-fill-first", narrow, [True, False],
                                        lambda f: setattr(ks, "FILL_FIRST", f), select)
    chosen["select-compact"] = sweep("select-compact", narrow, [0, 4, 16],
                                     lambda g: setattr(ks, "COMPACT_MERGE_MAX_GP", g), select)

    def group_path(x):
        return run_selected(x["q"], x["k"], x["v"], x["idx"], x["pos0"], slc_block=64, scale=x["scale"], path="group")

    x = shapes["paper128"]
    x["idx"] = select(x)
    chosen["slc-group"] = sweep("slc-group", [("paper128", x)], [(64, 4, 3), (64, 4, 4), (32, 4, 4), (64, 8, 3)],
                                lambda c: kslc.GROUP_LAUNCH.__setitem__("narrow", c), group_path)
    x = shapes["paper192"]
    _, x["lse"] = cmp(x)
    x["idx"] = select(x)
    chosen["slc-group-wide"] = sweep("slc-group-wide", [("paper192", x)],
                                     [(64, 4, 2), (32, 4, 3), (32, 4, 2), (64, 8, 2)],
                                     lambda c: kslc.GROUP_LAUNCH.__setitem__("wide", c), group_path)
    chosen["nsa-forced-dense"] = sweep(
        "nsa-forced-dense", narrow, [True, False], lambda f: setattr(knsa, "FORCED_DENSE", f),
        lambda x: kernels.nsa_attention(x["q"], x["k"], x["v"], x["kc"], x["vc"], x["gates"], config=x["cfg"]))
    x = shapes["small"]
    x["idx"] = select(x)
    chosen["slc-block-launch"] = sweep(
        "slc-block-launch", [("small", x)],
        [(128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 2), (256, 64, 8, 2), (64, 64, 4, 2), (128, 32, 4, 3)],
        lambda c: setattr(kslc, "BLOCK_PATH_LAUNCH", c),
        lambda x: run_selected(x["q"], x["k"], x["v"], x["idx"], x["pos0"], slc_block=64, scale=x["scale"],
                               path="block"))
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--decode-lengths", type=int, nargs="*", default=[16384, 65536],
                        help="cache lengths of the decode step (none: skip decode)")
    parser.add_argument("--tune", type=int, default=0,
                        help="first sweep the launch settings at this length and measure with the fastest")
    parser.add_argument("--knobs", nargs="+", default=[], help="with --tune: sweep only these knobs")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name()
    rows, errors = [], []
    meta = {"card": card, "date": dt.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton.__version__, "dtype": "bfloat16", "batch": 1, **GEOMETRY,
            "method": "triton.testing.do_bench median, warmup 25 ms, rep 100 ms, random normal inputs"}
    try:
        import fla
        meta["fla_core"] = getattr(fla, "__version__", "unknown")
    except ImportError:
        pass
    meta.update({k: round(v, 3) for k, v in ceilings().items()})
    if args.tune:
        try:
            meta["tuned"] = json.dumps(tune(rows, errors, args.tune, args.knobs))
            print("tuned launch settings:", meta["tuned"])
        except Exception:
            errors.append(f"tune: {traceback.format_exc(limit=3)}")
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{card_slug(card)}-{meta['date']}.json"

    def save():  # after every shape and length, so that a run cut short keeps what it measured
        path.write_text(json.dumps({**meta, "errors": errors, "results": rows}, indent=1) + "\n")

    save()
    # Prefill, the longest first (the goals are set at 64k), then the decode step.
    runs = [(run_shape, name, T) for T in sorted(args.lengths, reverse=True) for name in args.shapes]
    runs += [(run_decode, name, T) for T in args.decode_lengths for name in ("paper128", "small")]
    for run, name, T in runs:
        try:
            run(name, T, rows, errors)
        except Exception:
            errors.append(f"{run.__name__} {name} T={T}: {traceback.format_exc(limit=3)}")
        torch.cuda.empty_cache()
        save()
        print(f"done {run.__name__} {name} T={T}", flush=True)
    print(f"{card}: copy {meta['copy_TBps']} TB/s, bf16 matmul {meta['matmul_TFLOPs']} TFLOP/s -> {path}")
    for err in errors:
        print("ERROR", err)
    print(format_table(rows))
    return 0


def format_table(rows):
    rows = [r for r in rows if not r["stage"].startswith("tune:")]  # the sweep's rows stay in the JSON
    stages = list(dict.fromkeys((r["stage"], r["impl"]) for r in rows))
    order = [*SHAPES, *(f"decode-{name}" for name in SHAPES)]
    keys = sorted({(r["shape"], r["T"]) for r in rows}, key=lambda x: (order.index(x[0]), x[1]))
    by = {(r["shape"], r["T"], r["stage"], r["impl"]): r["ms"] for r in rows}
    head = "| shape | T | " + " | ".join(f"{s} {i}" for s, i in stages) + " |"
    lines = [head, "|" + "---|" * (len(stages) + 2)]
    for shape, T in keys:
        cells = [f"{by[(shape, T, s, i)]:.2f}" if (shape, T, s, i) in by else "-" for s, i in stages]
        lines.append(f"| {shape} | {T // 1024}k | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
