"""Check nsa_core.limits' memory estimate against what a CPU forward really takes.

For each context length, a fresh subprocess builds the model, runs a short warm-up, then runs one
forward (optionally traced) and reports two measured peaks:
- allocated: the peak of live tensor bytes, from torch.profiler's allocation events (exact);
- rss: growth of the process's resident set (VmHWM after, VmRSS before; the peak counter is reset
  through /proc/self/clear_refs), what the operating system really had to find.
They are printed next to `estimate_memory(...).tensor_bytes` and `.total_bytes` (with the allocator
overhead) as a table; docs/reliability.md records a run.

    python benchmarks/memory_estimate.py --tokens 1024 2048 4096 8192 --trace both
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from nsa_core import limits
from nsa_core.config import NSAConfig

# A small config whose selection stage (the T x Ns term) dominates already at a few thousand tokens.
SMALL = {"d_model": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "head_dim": 16, "v_head_dim": 16,
         "mlp_hidden": 128, "cmp_block": 16, "cmp_stride": 8, "slc_block": 16, "top_n": 4, "window": 64,
         "cmp_mlp_hidden": 16}

_CHILD = r"""
import json, sys, torch
from torch.profiler import ProfilerActivity, profile
from nsa_core.config import NSAConfig
from nsa_core.model import NSALM

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

cfg, T, trace, mode = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
torch.manual_seed(0)
model = NSALM(NSAConfig(**cfg)).eval().requires_grad_(False)
with torch.inference_mode():
    model(torch.randint(0, 256, (1, 64)), trace=trace)  # load every kernel library once
ids = torch.randint(0, 256, (1, T))
if mode == "rss":
    base = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    with torch.inference_mode():
        out = model(ids, trace=trace)
    print(json.dumps({"bytes": status("VmHWM:") - base}))
else:
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(ids, trace=trace)
        del out
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    print(json.dumps({"bytes": peak}))
"""


def measure(config: dict, tokens: int, trace: bool, mode: str) -> int:
    """Peak bytes of one forward in a fresh process: mode "rss" or "allocated"."""
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(config), str(tokens), "1" if trace else "0", mode],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["bytes"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--config", choices=["default", "small"], default="default")
    parser.add_argument("--trace", choices=["on", "off", "both"], default="both")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    config = {} if args.config == "default" else SMALL
    traces = {"on": [True], "off": [False], "both": [False, True]}[args.trace]
    rows = []
    for T in args.tokens:
        for trace in traces:
            est = limits.estimate_memory(NSAConfig(**config), T, dtype=torch.float32, trace=trace)
            row = {"config": args.config, "tokens": T, "trace": trace, "phase": est.phase,
                   "estimate_mib": est.tensor_bytes / 2**20, "estimate_with_overhead_mib": est.total_bytes / 2**20,
                   "allocated_mib": measure(config, T, trace, "allocated") / 2**20,
                   "rss_mib": measure(config, T, trace, "rss") / 2**20}
            rows.append(row)
            print(f"{args.config:>7} T={T:>6} trace={trace!s:<5} peak stage {row['phase']:<16} "
                  f"estimate {row['estimate_mib']:8.1f} MiB "
                  f"(x{est.overhead}: {row['estimate_with_overhead_mib']:8.1f}) "
                  f"allocated {row['allocated_mib']:8.1f} MiB  rss {row['rss_mib']:8.1f} MiB", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
