"""Train and evaluate the shipped twins, nsa-tiny and dense-tiny, in one GPU session.

    python sample_models/build_samples.py --out DIR [--nsa-budget 200] [--niah-lengths 1024,...,32768]

1. checks the FlexAttention training path against the reference (forward and gradients) on this GPU;
2. trains nsa-tiny from sample_models/nsa-tiny/recipe.json within --nsa-budget seconds, which fixes
   its step count; then dense-tiny from its recipe for exactly the same steps (same data and seed);
3. runs the needle-in-a-haystack grid of both on held-out haystacks and writes niah.json;
4. rewrites each model card with its grid and the twin's beside it.
Each finished model folder is also packed as DIR/<name>.tar, so a run cut short still returns what it did.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nsa_core import data, niah, reference, training  # noqa: E402
from nsa_core.checkpoint import save_pretrained  # noqa: E402
from nsa_core.config import NSAConfig  # noqa: E402
from nsa_core.train_attention import FlexNSA  # noqa: E402

NAMES = ("nsa-tiny", "dense-tiny")


def check_flex_path(device: torch.device) -> dict[str, float]:
    """Relative error of the FlexAttention path against the float32 reference, output and input gradients."""
    c = NSAConfig(n_head=8, n_kv_head=2, head_dim=32, v_head_dim=32, top_n=4, window=128)
    B, T, H, HQ, D = 2, 1000, 2, 8, 32
    g = torch.Generator(device=device).manual_seed(0)
    Tc = (T - c.cmp_block) // c.cmp_stride + 1
    shapes = [(B, T, HQ, D), (B, T, H, D), (B, T, H, D), (B, Tc, H, D), (B, Tc, H, D)]
    inputs = [torch.randn(s, device=device, generator=g, requires_grad=True) for s in shapes]
    inputs.append(torch.rand(B, T, HQ, 3, device=device, generator=g, requires_grad=True))
    ref = reference.nsa_attention(*inputs, config=c)
    out = FlexNSA(compile=False).nsa_attention(*inputs, config=c)
    w = torch.randn(ref.shape, device=device, generator=g)
    g_ref = torch.autograd.grad((ref * w).sum(), inputs)
    g_out = torch.autograd.grad((out * w).sum(), inputs)
    errors = {"out": ((out - ref).norm() / ref.norm()).item()}
    for name, a, b in zip(("q", "k", "v", "k_cmp", "v_cmp", "gates"), g_out, g_ref, strict=True):
        errors[f"grad_{name}"] = ((a - b).norm() / b.norm()).item()
    return errors


# What ships: the checkpoint, its recipe, NIAH results and training log (not the optimizer state).
SHIPPED = ("config.json", "model.safetensors", "README.md", "metrics.json", "recipe.json", "niah.json",
           "train_log.jsonl")


def pack(folder: Path, out: Path) -> None:
    with tarfile.open(out / f"{folder.name}.tar", "w") as tar:
        for name in SHIPPED:
            if (folder / name).is_file():
                tar.add(folder / name, arcname=f"{folder.name}/{name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/nsa_samples"))
    parser.add_argument("--nsa-budget", type=float, default=200.0, help="seconds of nsa-tiny training")
    parser.add_argument("--max-steps", type=int, help="fixed step count instead of the budget (both models)")
    parser.add_argument("--niah-lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--niah-depths", type=int, default=10)
    parser.add_argument("--niah-trials", type=int, default=20)
    parser.add_argument("--niah-batch", type=int, default=20)
    parser.add_argument("--niah-long-trials", type=int, default=10, help="trials per cell above 16384 tokens")
    parser.add_argument("--deadline", type=float, default=560.0,
                        help="seconds after start to stop starting NIAH lengths")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(device)}", flush=True)

    errors = check_flex_path(device)
    shown = json.dumps({k: f"{v:.2e}" for k, v in errors.items()})
    print(f"flex path vs reference (relative error): {shown}", flush=True)
    if max(errors.values()) > 1e-3:
        print("the FlexAttention path disagrees with the reference: stopping", flush=True)
        return 1

    results = {}
    steps = args.max_steps
    for name in NAMES:
        recipe = training.Recipe.load(ROOT / "sample_models" / name / "recipe.json")
        if steps is None:
            recipe = recipe.replace(time_budget_s=args.nsa_budget)
        else:
            recipe = recipe.replace(max_steps=steps, time_budget_s=None)
        result = training.train(recipe, args.work / name, device=device, progress=False)
        steps = result.recipe.max_steps
        results[name] = result
        print(f"{name}: {json.dumps(result.metrics)}", flush=True)
        pack(args.work / name, args.out)

    haystack = data.stdlib_corpus("heldout", heldout_fraction=results["nsa-tiny"].recipe.heldout_fraction)
    lengths = [int(x) for x in args.niah_lengths.split(",")]
    depths = niah.even_depths(args.niah_depths)
    grids = {}
    for name in NAMES:
        model = results[name].model.to(device)
        done_lengths, cells, seconds = [], [], []
        for length in lengths:
            left = args.deadline - (time.perf_counter() - t_start)
            # NSA prefill cost grows about linearly with length; stop before a length that cannot finish.
            if seconds and left < 2.2 * seconds[-1] + 5:
                print(f"{name}: skipping NIAH length {length} and above ({left:.0f} s left)", flush=True)
                break
            t0 = time.perf_counter()
            trials = args.niah_trials if length <= 16384 else args.niah_long_trials
            part = niah.sweep(model, haystack, lengths=[length], depths=depths, trials=trials,
                              batch_size=args.niah_batch, progress=False)
            seconds.append(time.perf_counter() - t0)
            done_lengths.append(length)
            cells.append(part)
            print(f"{name} NIAH {length}: min {min(part['accuracy'][0]):.2f} mean "
                  f"{sum(part['accuracy'][0]) / len(depths):.2f} ({seconds[-1]:.1f} s)", flush=True)
        grid = merge_sweeps(cells)
        grids[name] = grid
        niah.write_results(grid, args.work / name / "niah.json")
        pack(args.work / name, args.out)

    for name in NAMES:
        twin = NAMES[1 - NAMES.index(name)]
        result = results[name]
        section = niah_section(name, grids[name], twin, grids.get(twin))
        metrics = dict(result.metrics, niah_min_accuracy_per_length=grids[name]["min_accuracy_per_length"])
        shipped = training._rounded(result.model, training.SAVE_DTYPES[result.recipe.save_dtype], keep=True)
        card = training.training_card(shipped, result.recipe, metrics, niah_section=section,
                                      command="python sample_models/build_samples.py --out DIR "
                                              f"--nsa-budget {args.nsa_budget:g}")
        save_pretrained(shipped.cpu(), args.work / name, metrics=metrics, card=card)
        (args.work / name / "train_state.pt").unlink(missing_ok=True)
        pack(args.work / name, args.out)
    print(f"done in {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0


def merge_sweeps(parts: list[dict]) -> dict:
    """One results dict from per-length sweeps (same depths, trials and seed)."""
    merged = dict(parts[0])
    merged["lengths"] = [p["lengths"][0] for p in parts]
    merged["accuracy"] = [p["accuracy"][0] for p in parts]
    merged["min_accuracy_per_length"] = {k: v for p in parts for k, v in p["min_accuracy_per_length"].items()}
    merged["seconds"] = round(sum(p["seconds"] for p in parts), 1)
    merged["cells"] = [c for p in parts for c in p["cells"]]
    return merged


def niah_section(name: str, grid: dict, twin: str, twin_grid: dict | None) -> str:
    lines = ["## Needle in a haystack", "",
             f"Exact-match accuracy (%) of a 5-digit passkey answered greedily by `generate()`, {grid['trials']} "
             f"trials per cell (each its own key and haystack offset), haystacks from the held-out files "
             f"(`nsa-explorer niah <this folder> --lengths {','.join(map(str, grid['lengths']))} "
             f"--depths {len(grid['depths'])} --trials {grid['trials']}`). Depth 0 is the start of the haystack, "
             "1 just before the question. Full results: `niah.json`.", "", f"### {name}", "", niah.format_grid(grid)]
    if twin_grid is not None:
        lines += ["", f"### {twin} (the twin, for comparison)", "", niah.format_grid(twin_grid)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
