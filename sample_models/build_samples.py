"""Train and evaluate the shipped twins, nsa-tiny and dense-tiny, in phases that fit GPU sessions.

    python sample_models/build_samples.py check                      # FlexAttention path vs reference
    # NSA first, in two runs: a base run whose time budget and curriculum fix its steps and stage starts,
    # then a long-context run from its weights (the recipes: see sample_models/README.md).
    torchrun --nproc_per_node=N -m nsa_core.cli train BASE_RECIPE --out WORK/nsa-base --time-budget S
    nsa-explorer train LONG_RECIPE --out WORK/nsa-tiny --init-from WORK/nsa-base [--stop-after-s S1] [--resume]
    python sample_models/build_samples.py twin --work WORK --world M  # WORK/dense-{base,tiny}.recipe.json
    torchrun --nproc_per_node=M -m nsa_core.cli train WORK/dense-base.recipe.json --out WORK/dense-base
    torchrun --nproc_per_node=M -m nsa_core.cli train WORK/dense-tiny.recipe.json --out WORK/dense-tiny
    python sample_models/build_samples.py serve --work WORK           # SERVED_SCORES, held-out loss again
    python sample_models/build_samples.py niah NAME --work WORK [--device cuda:1]   # one per GPU, in parallel
    python sample_models/build_samples.py cards --work WORK --out OUT

The text is the standard library of the Python that runs each phase, unless `--corpus-root` names
another (train, serve and niah take it): the shipped runs read Ubuntu's 3.12.3 library, without the
tests that Debian and Ubuntu ship separately (docs/training.md). The cards say which text each run read.

To rerun a shipped model, use its own base_recipe.json and recipe.json (steps fixed) with `--init-from`
naming the base run's output. The base recipe's recorded stage starts replay the same rows only on the
same text and process layout; elsewhere set them to null, so that the NSA base moves on when it has
learned each stage (docs/training.md), and let `twin` give the dense base the starts it recorded.

Each dense twin's recipe is the matching NSA run's final recipe with the attention switched: the same
steps, the same frozen weights (`trainable`) and, through the recorded `stage_starts`, exactly the same
batches, although the NSA run's curriculum was set by its own accuracy. The global batch stays
the same on any number of processes M (the rows of a step depend only on their global index). `niah`
sweeps context length x depth on held-out haystacks into WORK/NAME/niah.json; `serve` switches a model
to the selection scores it ships with (SERVED_SCORES; weights unchanged) and measures its held-out loss
again, so the grids and the card describe the model as served; `cards` writes each model card with its
grid and the twin's beside it, drops the optimizer state and packs each shipped folder as OUT/NAME.tar.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nsa_core import data, niah, reference, training  # noqa: E402
from nsa_core.checkpoint import load_pretrained, read_card, read_config, save_pretrained  # noqa: E402
from nsa_core.config import NSAConfig  # noqa: E402
from nsa_core.train_attention import FlexNSA  # noqa: E402

NAMES = ("nsa-tiny", "dense-tiny")
# Each shipped model is a long-context run from the weights of a base run trained from scratch.
BASES = {"nsa-tiny": "nsa-base", "dense-tiny": "dense-base"}
# Each NSA run (base, then long-context) and its dense twin.
TWINS = {BASES[NAMES[0]]: BASES[NAMES[1]], NAMES[0]: NAMES[1]}
BASE_METRICS = ("steps", "tokens", "train_seconds", "world_size", "device", "heldout_loss_nats_per_byte")
# Selection scores a shipped model is served with where they differ from its recipe's (docs/decisions.md):
# nsa-tiny, trained with the paper's, finds far needles with "free" (sample_models/README.md).
SERVED_SCORES = {"nsa-tiny": "free"}
# What ships: the checkpoint, its recipe, NIAH results and training log (not the optimizer state).
BASE_LOG_FILE = "base_train_log.jsonl"
SHIPPED = ("config.json", "model.safetensors", "README.md", "metrics.json", "recipe.json", "base_recipe.json",
           "niah.json", "train_log.jsonl", BASE_LOG_FILE)


def check_flex_path(device: torch.device, triton_select: bool) -> dict[str, float]:
    """Relative error of the FlexAttention path against the float32 reference, output and input gradients."""
    c = NSAConfig(n_head=8, n_kv_head=2, head_dim=32, v_head_dim=32, top_n=4, window=128)
    B, T, H, HQ, D = 2, 1000, 2, 8, 32
    g = torch.Generator(device=device).manual_seed(0)
    Tc = (T - c.cmp_block) // c.cmp_stride + 1
    shapes = [(B, T, HQ, D), (B, T, H, D), (B, T, H, D), (B, Tc, H, D), (B, Tc, H, D)]
    inputs = [torch.randn(s, device=device, generator=g, requires_grad=True) for s in shapes]
    inputs.append(torch.rand(B, T, HQ, 3, device=device, generator=g, requires_grad=True))
    ref = reference.nsa_attention(*inputs, config=c)
    out = FlexNSA(compile=False, triton_select=triton_select).nsa_attention(*inputs, config=c)
    w = torch.randn(ref.shape, device=device, generator=g)
    g_ref = torch.autograd.grad((ref * w).sum(), inputs)
    g_out = torch.autograd.grad((out * w).sum(), inputs)
    errors = {"out": ((out - ref).norm() / ref.norm()).item()}
    for name, a, b in zip(("q", "k", "v", "k_cmp", "v_cmp", "gates"), g_out, g_ref, strict=True):
        errors[f"grad_{name}"] = ((a - b).norm() / b.norm()).item()
    return errors


def check(args) -> int:
    device = torch.device("cuda")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(device)}", flush=True)
    worst = 0.0
    for triton_select in (False, True):
        errors = check_flex_path(device, triton_select)
        worst = max(worst, *errors.values())
        shown = json.dumps({k: f"{v:.2e}" for k, v in errors.items()})
        print(f"flex path (triton select: {triton_select}) vs reference, relative error: {shown}", flush=True)
    if worst > 1e-3:
        print("the FlexAttention path disagrees with the reference", flush=True)
        return 1
    return 0


def twin(args) -> int:
    """The dense twin's recipe of each finished NSA run: its final recipe (steps, stage starts), dense attention.

    WORK/nsa-base gives WORK/dense-base.recipe.json; WORK/nsa-tiny (which starts from nsa-base's weights)
    gives WORK/dense-tiny.recipe.json, starting from dense-base's. Runs not finished yet are skipped.
    """
    written = 0
    for nsa_name, dense_name in TWINS.items():
        folder = args.work / nsa_name
        if not (folder / "metrics.json").is_file():
            continue
        nsa = training.Recipe.load(folder / training.RECIPE_FILE)
        # Rows are drawn per global row index, so the same global batch over args.world processes is the same data.
        global_batch = nsa.batch_size * json.loads((folder / "metrics.json").read_text())["world_size"]
        if global_batch % args.world:
            print(f"{nsa_name}'s global batch of {global_batch} rows does not split over {args.world} processes",
                  file=sys.stderr)
            return 1
        init_from = str(args.work / BASES[dense_name]) if nsa.init_from is not None else None
        # The same recipe in everything but the attention, `trainable` and `init_decay` included: keeping
        # part of the base run's weights helps a dense model too (docs/training.md). The selection-alignment
        # loss trains NSA's block ranking, which a dense model does not have.
        dense = nsa.replace(name=NAMES[1], model=dict(nsa.model, attention="dense"),
                            batch_size=global_batch // args.world, init_from=init_from, select_align_weight=0.0)
        path = args.work / f"{dense_name}.recipe.json"
        path.write_text(dense.to_json(), encoding="utf-8")
        print(f"wrote {path}: {dense.max_steps} steps of {dense.batch_size} rows x {args.world} processes, "
              f"stage starts {dense.stage_starts}, init_from {init_from}", flush=True)
        written += 1
    if not written:
        print(f"no finished NSA run in {args.work} ({', '.join(TWINS)})", file=sys.stderr)
        return 1
    return 0


def serve(args) -> int:
    """Switch each model of SERVED_SCORES to its scores (the weights stay) and measure its held-out loss again;
    the loss with the scores it was trained with stays in metrics.json as trained_scores_heldout_loss."""
    for name, scores in SERVED_SCORES.items():
        folder = args.work / name
        if read_config(folder).slc_scores == scores:
            continue
        recipe = training.Recipe.load(folder / training.RECIPE_FILE)
        trained = load_pretrained(folder)  # stored dtype
        model = trained.with_selection_scores(scores)
        metrics = json.loads((folder / "metrics.json").read_text())
        text = data.corpus_summary(args.corpus_root, heldout_fraction=recipe.heldout_fraction)
        if error := other_text(metrics, text):
            print(f"{name}: {error}", file=sys.stderr)
            return 1
        metrics["trained_scores_heldout_loss"] = metrics["heldout_loss_nats_per_byte"]
        heldout = data.stdlib_corpus("heldout", heldout_fraction=recipe.heldout_fraction, root=args.corpus_root)
        # Evaluated as the training run's own final evaluation is: the stored weights in float32.
        metrics.update(training.evaluate_heldout(model.to(args.device, torch.float32), heldout,
                                                 seq_len=recipe.seq_len, rows=recipe.eval_rows))
        save_pretrained(model.to("cpu", trained.dtype), folder, metrics=metrics, card=read_card(folder))
        print(f"{name}: slc_scores {scores}, held-out {metrics['heldout_loss_nats_per_byte']} nats/byte "
              f"({metrics['trained_scores_heldout_loss']} with {trained.config.slc_scores})", flush=True)
    return 0


def other_text(metrics: dict, here: dict) -> str:
    """Why the text `here` (data.corpus_summary) is not the one the run recorded, or "" when it is (or the run
    recorded none): a card's loss and grids are measured on the run's own held-out files."""
    if "corpus" not in metrics or here["sha256"] == metrics["corpus"]["sha256"]:
        return ""
    return (f"the run read {data.describe_corpus(metrics['corpus'])} This phase would read "
            f"{data.describe_corpus(here)} Pass the run's --corpus-root.")


def served_section(model, recipe, metrics: dict) -> str:
    """The card's note on selection scores that differ from the ones the recipe trained with, else ""."""
    served, trained = model.config.slc_scores, recipe.config.slc_scores
    if served == trained:
        return ""
    return (f"## Selection scores\n\nThe weights are the long-context run's; `config.json` sets `slc_scores` to "
            f'"{served}", while the run trained with "{trained}" (`recipe.json`). The scores change which blocks '
            "are selected, nothing else: \"free\" renormalises each query head's block importance over the blocks "
            "that are not forced before the group sum (`docs/decisions.md`). The held-out loss and the grids here "
            f"are measured as served; with \"{trained}\" the held-out loss was "
            f"{metrics['trained_scores_heldout_loss']} nats per byte. `sample_models/README.md` and `docs/training.md` "
            "compare the two rules on NIAH.")


def run_niah(args) -> int:
    """The NIAH grid of one trained model, length by length, stopping before a length that cannot finish."""
    t_start = time.perf_counter()
    folder = args.work / args.name
    recipe = training.Recipe.load(folder / training.RECIPE_FILE)
    text = data.corpus_summary(args.corpus_root, heldout_fraction=recipe.heldout_fraction)
    if error := other_text(json.loads((folder / "metrics.json").read_text()), text):
        print(f"{args.name}: {error}", file=sys.stderr)
        return 1
    model = load_pretrained(folder, device=args.device, dtype=torch.float32)
    haystack = data.stdlib_corpus("heldout", heldout_fraction=recipe.heldout_fraction, root=args.corpus_root)
    depths = niah.even_depths(args.depths)
    parts, seconds = [], []
    for length in [int(x) for x in args.lengths.split(",")]:
        left = args.deadline - (time.perf_counter() - t_start)
        # NSA prefill cost grows about linearly with length; stop before a length that cannot finish.
        if seconds and left < 2.2 * seconds[-1] + 5:
            print(f"{args.name}: skipping NIAH length {length} and above ({left:.0f} s left)", flush=True)
            break
        t0 = time.perf_counter()
        trials = args.trials if length <= 16384 else args.long_trials
        part = niah.sweep(model, haystack, lengths=[length], depths=depths, trials=trials,
                          batch_size=args.batch, progress=False)
        seconds.append(time.perf_counter() - t0)
        parts.append(part)
        print(f"{args.name} NIAH {length}: min {min(part['accuracy'][0]):.2f} mean "
              f"{sum(part['accuracy'][0]) / len(depths):.2f} ({seconds[-1]:.1f} s)", flush=True)
        # What is done so far survives a cut.
        niah.write_results(merge_sweeps(parts) | {"haystack": text}, folder / "niah.json")
    return 0


def cards(args) -> int:
    """Each model card with both grids; the shipped weights are the trained checkpoint itself.

    A model trained in two runs ships its base run's recipe and log (base_recipe.json,
    base_train_log.jsonl), its own recipe's init_from pointing at "base" (the folder a reader trains
    the base run into), and the base run's numbers under metrics.json's "base".
    """
    grids = {name: json.loads((args.work / name / "niah.json").read_text()) for name in NAMES}
    for name in NAMES:
        folder = args.work / name
        twin_name = NAMES[1 - NAMES.index(name)]
        recipe = training.Recipe.load(folder / training.RECIPE_FILE)
        metrics = json.loads((folder / "metrics.json").read_text())
        metrics["niah_min_accuracy_per_length"] = grids[name]["min_accuracy_per_length"]
        model = load_pretrained(folder)  # stored dtype
        section = niah_section(name, grids[name], twin_name, grids[twin_name])
        served = served_section(model, recipe, metrics)
        if served:
            section += "\n\n" + served
        base = None
        if recipe.init_from is not None:
            base_folder = args.work / BASES[name]
            base_recipe = training.Recipe.load(base_folder / training.RECIPE_FILE).replace(name=name)
            base_metrics = json.loads((base_folder / "metrics.json").read_text())
            (folder / training.BASE_RECIPE_FILE).write_text(base_recipe.to_json(), encoding="utf-8")
            shutil.copyfile(base_folder / training.LOG_FILE, folder / BASE_LOG_FILE)
            recipe = recipe.replace(init_from="base")
            (folder / training.RECIPE_FILE).write_text(recipe.to_json(), encoding="utf-8")
            metrics["base"] = {k: base_metrics[k] for k in BASE_METRICS}
            base = (base_recipe, base_metrics, training.train_command(training.BASE_RECIPE_FILE, base_metrics, "base"))
        command = training.train_command(training.RECIPE_FILE, metrics, "<dir>")
        if base is not None:
            command += " --init-from base"
        card = training.training_card(model, recipe, metrics, niah_section=section, command=command, base=base)
        save_pretrained(model, folder, metrics=metrics, card=card)
        (folder / training.STATE_FILE).unlink(missing_ok=True)
        pack(folder, args.out)
    return 0


def pack(folder: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / f"{folder.name}.tar", "w") as tar:
        for name in SHIPPED:
            if (folder / name).is_file():
                tar.add(folder / name, arcname=f"{folder.name}/{name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="phase", required=True)
    sub.add_parser("check", help="FlexAttention path against the reference on this GPU")
    p = sub.add_parser("twin", help="write WORK/dense-{base,tiny}.recipe.json from the finished NSA runs")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--world", type=int, default=1, help="processes the twin will train on")
    corpus = argparse.ArgumentParser(add_help=False)
    corpus.add_argument("--corpus-root", type=Path,
                        help="the standard-library folder the runs trained on (default: this Python's)")
    p = sub.add_parser("serve", parents=[corpus],
                       help="WORK's models as served (SERVED_SCORES), held-out loss measured again")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("niah", parents=[corpus], help="the NIAH grid of WORK/NAME into WORK/NAME/niah.json")
    p.add_argument("name", choices=NAMES)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--depths", type=int, default=10)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--long-trials", type=int, default=10, help="trials per cell above 16384 tokens")
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--deadline", type=float, default=400.0, help="seconds after which no new length starts")
    p = sub.add_parser("cards", help="model cards with both grids; pack the shipped folders into OUT")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    return {"check": check, "twin": twin, "serve": serve, "niah": run_niah, "cards": cards}[args.phase](args)


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
