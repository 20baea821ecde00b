"""Trace time and peak memory of a model the size of nsa-tiny (NSAConfig defaults), and the cost of
the quadratic analyses of one layer.

    python benchmarks/bench_trace.py --device cpu --lengths 2048,4096,8192
    python benchmarks/bench_trace.py --device cuda --lengths 16384,32768,65536

Per length it times: the plain forward; the forward with the trace on (the trace moved to host
memory included); the projections of the last layer (`analysis.layer_inputs`); the pooled dense map
(512 x 512, with the covered part) of every query head of that layer, after a first map that may
compile the kernel variant for the length's cell size (timed apart as first_map_s); dense recall and
oracle overlap of that layer. "goal" = traced forward + inputs + maps, the issue's "trace of a
64k-token input with pooled dense maps for one layer" (target on an H100: under 2 s). Each CPU length runs in
a fresh process so that its peak RSS is its own; on CUDA one process runs all lengths after a
warm-up that compiles the kernels, and reports the peak GPU memory per length. CPU times are
process CPU seconds (summed over threads), GPU times synchronised wall seconds. Weights are random
(the numbers depend on shapes, not on training); token ids are random bytes. Results go to
benchmarks/results/trace_<device>_<date>.json and a table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nsa_core import analysis  # noqa: E402
from nsa_core.config import NSAConfig  # noqa: E402
from nsa_core.model import NSALM  # noqa: E402


def timed(fn, device):
    """(fn(), seconds). On the CPU the seconds are the process's CPU time (all threads), which a
    shared machine's other load inflates far less than wall time; on CUDA, synchronised wall time."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - start
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def measure(model: NSALM, T: int, *, maps_heads: int, analyses: bool) -> dict:
    device = model.device
    c = model.config
    layer = c.n_layer - 1
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(T)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row: dict = {"T": T}
    with torch.no_grad():
        _, row["plain_s"] = timed(lambda: model(ids), device)
        (_, trace), row["trace_s"] = timed(lambda: model(ids, trace=True), device)
        inputs, row["inputs_s"] = timed(lambda: analysis.layer_inputs(model, ids, layer), device)
        # The first map at a new cell size compiles a kernel variant once; it is reported apart.
        _, row["first_map_s"] = timed(lambda: analysis.pooled_dense_map(model, ids, layer=layer, head=0, trace=trace,
                                                                        inputs=inputs), device)
        maps, row["maps_s"] = timed(lambda: [analysis.pooled_dense_map(model, ids, layer=layer, head=h, trace=trace,
                                                                       inputs=inputs) for h in range(maps_heads)],
                                    device)
        if analyses:
            recall, row["recall_s"] = timed(lambda: analysis.dense_recall(model, ids, trace, layer=layer,
                                                                          inputs=inputs), device)
            overlap, row["oracle_s"] = timed(lambda: analysis.oracle_overlap(model, ids, trace, layer=layer,
                                                                             inputs=inputs), device)
            row["mean_recall"] = float(recall.mean())
            row["mean_oracle_overlap"] = float(overlap.mean())
    row["maps_heads"] = maps_heads
    row["map_cells"] = list(maps[0].values.shape)
    row["map_mass_error"] = float(abs(maps[0].values.sum() - T) / T)  # each row carries mass 1
    row["goal_s"] = row["trace_s"] + row["inputs_s"] + row["maps_s"] * (c.n_head / maps_heads)
    row["trace_mb"] = trace.nbytes / 1e6
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 1e6
    row["backend"] = model.ops()[1]
    return row


def build(device: str) -> NSALM:
    torch.manual_seed(0)
    model = NSALM(NSAConfig()).to(device).eval()
    if device == "cuda":
        model.backend = "auto"
    return model


def child(T: int, maps_heads: int, analyses: bool) -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(json.dumps(measure(build("cpu"), T, maps_heads=maps_heads, analyses=analyses)))


def run_cpu(lengths, maps_heads, analyses) -> list[dict]:
    rows = []
    for T in lengths:
        cmd = [sys.executable, __file__, "--child", str(T), "--maps-heads", str(maps_heads)]
        if not analyses:
            cmd.append("--no-analyses")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"T={T}: {rows[-1]}", flush=True)
    return rows


def run_cuda(lengths, maps_heads, analyses) -> list[dict]:
    model = build("cuda")
    try:
        measure(model, 2048, maps_heads=1, analyses=analyses)  # compile every kernel once
    except Exception as err:  # noqa: BLE001 - a broken attention backend must not hide the analyses' numbers
        print(f"backend 'auto' failed ({type(err).__name__}: {err}); timing the reference instead", flush=True)
        model.backend = "reference"
        measure(model, 2048, maps_heads=1, analyses=analyses)
    rows = []
    for T in lengths:
        try:
            rows.append(measure(model, T, maps_heads=maps_heads, analyses=analyses))
        except Exception as err:  # noqa: BLE001 - record the failure (OOM, kernel error) and go on
            rows.append({"T": T, "error": f"{type(err).__name__}: {err}"})
            torch.cuda.empty_cache()
        print(f"T={T}: {rows[-1]}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", default=None, help="comma-separated token counts")
    parser.add_argument("--maps-heads", type=int, default=None, help="heads whose map is timed (default: all on "
                        "CUDA, 1 on CPU; goal_s scales the time to all heads)")
    parser.add_argument("--no-analyses", action="store_true", help="skip dense recall and oracle overlap")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/...)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    heads = args.maps_heads or (NSAConfig().n_head if args.device == "cuda" else 1)
    if args.child:
        child(args.child, heads, not args.no_analyses)
        return 0
    default = "16384,32768,65536" if args.device == "cuda" else "2048,4096,8192"
    lengths = [int(x) for x in (args.lengths or default).split(",")]
    rows = (run_cuda if args.device == "cuda" else run_cpu)(lengths, heads, not args.no_analyses)
    card = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    slug = "h100" if "H100" in card else "h200" if "H200" in card else args.device
    today = datetime.date.today().isoformat()
    result = {
        "benchmark": "trace", "date": today, "device": card, "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "torch": torch.__version__, "config": NSAConfig().to_dict(),
        "rows": rows,
    }
    out = args.out or REPO / "benchmarks" / "results" / f"trace_{slug}_{today}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    cols = ["T", "plain_s", "trace_s", "inputs_s", "first_map_s", "maps_s", "recall_s", "oracle_s", "goal_s",
            "trace_mb",
            "peak_rss_mb", "peak_gpu_mb"]
    print(f"\n{card}, model NSAConfig() (d_model 256, 4 layers, HQ 8, H 2), maps of {heads} head(s) per layer")
    print(" ".join(f"{c:>11}" for c in cols))
    for row in rows:
        print(" ".join(f"{row[c]:>11.3f}" if isinstance(row.get(c), float) else f"{row.get(c, '-'):>11}" for c in cols))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
