"""`nsa-explorer train`: train an NSALM from a recipe (a JSON file kept next to the checkpoint it makes).

    nsa-explorer train RECIPE.json --out DIR [--device cuda] [--resume] [--max-steps N] [--time-budget S]
        [--init-from CHECKPOINT_DIR]
    torchrun --nproc_per_node=2 -m nsa_core.cli train RECIPE.json --out DIR    # data-parallel (DDP)

Data: the standard library's train files mixed with passkey tasks (`data.py`). On a GPU the step runs
under bf16 autocast and NSA layers go through FlexAttention (`train_attention.py`), since the Triton
kernels are forward-only; on a CPU they go through the differentiable reference. The dense twin uses
PyTorch's scaled_dot_product_attention either way.

A run may start from another checkpoint's weights (`init_from`, a second phase such as a long-context
fine-tune) with a fresh optimizer; the model fields must match that checkpoint's config. It may train only
some weights (`trainable`) and pull them back toward that checkpoint's after every step (`init_decay`).

A time budget turns into a step count once: after `calibrate_steps` timed steps the run fixes
max_steps so the rest fits, before warm-up ends, so the learning-rate schedule is the one a rerun
with that max_steps and no budget would follow. The recipe written next to the checkpoint records it.

DIR receives: recipe.json, train_log.jsonl (one line per logged step, one per held-out evaluation with
`eval_every`, and one per curriculum stage begun after a logged step, with the answer accuracy the run
had reached before it), train_state.pt (model, optimizer and step, for --resume; tensors only, loaded with
weights_only=True) and, at the end, the checkpoint files (config.json, model.safetensors, README.md,
metrics.json).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from . import data, reference, selection_alignment
from .checkpoint import load_pretrained, model_card, read_config, save_pretrained
from .config import NSAConfig
from .model import NSALM

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
RECIPE_FILE = "recipe.json"
BASE_RECIPE_FILE = "base_recipe.json"  # next to a checkpoint trained in two runs: the first run's recipe
ATTENTION_PATHS = ("auto", "flex", "reference")
SELECT_ALIGN_TRAINS = ("all", "compressor")
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Config fields a run may change from its init_from checkpoint's: how the selection ranks blocks is a rule
# on top of the weights, so a second phase can train under the other rule.
INIT_FROM_MAY_DIFFER = ("slc_scores",)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Everything a training run depends on; a recipe file is this as JSON."""

    name: str
    model: dict[str, Any] = field(default_factory=dict)  # NSAConfig fields (defaults elsewhere)
    seed: int = 0
    # A checkpoint directory whose weights start the run instead of the seeded initialisation,
    # relative to the working directory (like --out). The optimizer starts fresh.
    init_from: str | None = None
    # Data.
    seq_len: int = 16384
    batch_size: int = 4  # rows per step per process
    heldout_fraction: float = 0.05
    min_task_len: int = 512
    multi_key_prob: float = 0.3
    start_needle_prob: float = 0.0  # share of single-key tasks whose needle comes right after <bos>
    curriculum_frac: float = 0.4
    # Advance the curriculum early once the answer-token accuracy, averaged over the last 3 logged steps
    # (all processes), reaches this; None follows the schedule alone.
    curriculum_gate: float | None = 0.9
    # The step at which each stage after the first began, as a run recorded it. When given, the
    # curriculum follows it exactly (gate and schedule unused), so a rerun, or a twin, sees the same data.
    stage_starts: list[int] | None = None
    answer_weight: float = 4.0  # loss weight of answer tokens relative to text tokens
    # Loss weight of each answer's first token, the one that must be read from the needle (later ones can
    # be copied once it is found); None gives it answer_weight.
    first_answer_weight: float | None = None
    # Share of rows whose selected branch is switched off (its gate set to 0 in every layer and head), so
    # the loss of those rows is paid through the compressed branch, whose scores rank the blocks: with its
    # gate near zero that ranking otherwise gets almost no gradient (docs/training.md).
    selected_dropout: float = 0.0
    # Weight of the selection-alignment loss (`selection_alignment.py`: the compressed branch's block ranking
    # trained toward where dense attention puts its mass), averaged over the NSA layers; 0 is off.
    select_align_weight: float = 0.0
    select_align_queries: int = 32  # query positions per row it samples, the answer-predicting ones first
    # What it trains: "all" (the queries, the keys and the compressors it reads) or "compressor" (only the key
    # compression MLPs: queries and raw keys detached, as DeepSeek-V3.2 detaches its indexer's input, so the
    # weights every branch shares get no gradient from it).
    select_align_trains: str = "all"
    # Optimisation.
    # Train only the parameters whose name contains one of these strings (".attn." for a long-context run
    # that leaves the MLPs, embeddings and norms as the run it starts from left them); None trains all.
    trainable: list[str] | None = None
    # Decay toward the init_from weights, per unit of learning rate: after each step every trained weight
    # moves lr * init_decay of the way back to where the run started (L2-SP, decoupled like AdamW's
    # weight decay), so that a second phase learns its task near its base instead of drifting away from
    # what the base learned; 0 is off.
    init_decay: float = 0.0
    max_steps: int = 1000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Run.
    time_budget_s: float | None = None  # wall-clock budget of the training loop, turned into max_steps
    calibrate_steps: int = 12  # steps timed (after the first 2, which compile) before fixing max_steps
    attention_path: str = "auto"  # "flex" on CUDA and "reference" elsewhere when auto
    log_every: int = 10
    ckpt_every: int = 200
    eval_rows: int = 8  # held-out rows of seq_len tokens for the final loss
    # Also measure the held-out loss every this many steps (logged as {"step", "heldout_loss"} lines), to
    # see when a run starts to fit its training files rather than the language; None: at the end only.
    eval_every: int | None = None
    save_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        NSAConfig.from_dict(self.model)  # validates the model fields with clear errors
        if self.attention_path not in ATTENTION_PATHS:
            raise ValueError(f"attention_path must be one of {list(ATTENTION_PATHS)}, got {self.attention_path!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype must be one of {sorted(SAVE_DTYPES)}, got {self.save_dtype!r}")
        if self.select_align_weight < 0:
            raise ValueError(f"select_align_weight must be >= 0, got {self.select_align_weight}")
        if self.select_align_trains not in SELECT_ALIGN_TRAINS:
            raise ValueError(f"select_align_trains must be one of {list(SELECT_ALIGN_TRAINS)}, got "
                             f"{self.select_align_trains!r}")
        if self.select_align_weight > 0 and self.config.attention != "nsa":
            raise ValueError("select_align_weight trains NSA's block ranking; a dense model has none (set it to 0)")
        for name in ("seq_len", "batch_size", "max_steps", "log_every", "ckpt_every", "eval_rows", "eval_every",
                     "select_align_queries"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        parts = self.trainable
        if parts is not None and (not parts or not all(isinstance(x, str) and x for x in parts)):
            raise ValueError(f"trainable must be a non-empty list of parameter-name parts or null, got {parts}")
        if self.init_decay < 0 or self.lr * self.init_decay > 1 or (self.init_decay > 0 and self.init_from is None):
            raise ValueError(f"init_decay must be in [0, 1 / lr], and > 0 only with init_from (got "
                             f"{self.init_decay}, lr {self.lr}, init_from {self.init_from})")
        if self.first_answer_weight is not None and self.first_answer_weight <= 0:
            raise ValueError(f"first_answer_weight must be > 0 or null, got {self.first_answer_weight}")
        if not 0.0 <= self.selected_dropout < 1.0:
            raise ValueError(f"selected_dropout must be in [0, 1), got {self.selected_dropout}")
        if self.curriculum_gate is not None and not 0.0 < self.curriculum_gate <= 1.0:
            raise ValueError(f"curriculum_gate must be in (0, 1] or null, got {self.curriculum_gate}")
        if self.stage_starts is not None and list(self.stage_starts) != sorted(self.stage_starts):
            raise ValueError(f"stage_starts must be ascending steps, got {self.stage_starts}")
        if self.time_budget_s is not None and self.calibrate_steps + 2 > self.warmup_steps:
            raise ValueError(f"calibrate_steps + 2 ({self.calibrate_steps + 2}) must be <= warmup_steps "
                             f"({self.warmup_steps}): the step count must be fixed before the decay starts")

    @property
    def config(self) -> NSAConfig:
        return NSAConfig.from_dict(self.model)

    @property
    def task_mix(self) -> data.TaskMix:
        return data.TaskMix(seq_len=self.seq_len, min_task_len=self.min_task_len, multi_key_prob=self.multi_key_prob,
                            start_needle_prob=self.start_needle_prob, curriculum_frac=self.curriculum_frac)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: recipe is not valid JSON: {err}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown recipe key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**raw)

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)


def lr_at(recipe: Recipe, step: int, max_steps: int) -> float:
    """Linear warm-up to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = min(1.0, (step - recipe.warmup_steps) / max(1, max_steps - recipe.warmup_steps))
    floor = recipe.lr * recipe.min_lr_ratio
    return floor + (recipe.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def forward_logits(model: NSALM, ids: torch.Tensor, ops) -> torch.Tensor:
    """NSALM's forward with an explicit attention implementation (the FlexAttention path is no backend
    `NSALM.forward` can resolve): ids [B, T] -> logits [B, T, vocab] float32."""
    x = model.embed(ids)
    for layer in model.layers:
        x, _ = layer(x, ops=ops)
    return model.lm_head(model.norm(x)).float()


@contextlib.contextmanager
def _keeping_compressor_inputs(model: NSALM, into: list[torch.Tensor] | None):
    """While active, append each layer's un-rotated keys (its key compressor's input) to `into`; None: nothing."""
    if into is None:
        yield
        return
    handles = [layer.attn.k_compress.register_forward_hook(lambda module, inputs, output: into.append(inputs[0]))
               for layer in model.layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class TrainingLoss(nn.Module):
    """The module DDP wraps: (inputs, targets, answer) [B, T] -> (weighted loss, text loss, answer accuracy,
    selection-alignment loss); the last is 0 unless the recipe's select_align_weight is."""

    def __init__(self, model: NSALM, ops, recipe: Recipe) -> None:
        super().__init__()
        self.model = model
        self.ops = ops
        self.answer_weight = recipe.answer_weight
        self.first_answer_weight = recipe.first_answer_weight
        self.selected_dropout = recipe.selected_dropout
        self.select_align_weight = recipe.select_align_weight
        self.select_align_queries = recipe.select_align_queries
        self.compressor_only = recipe.select_align_trains == "compressor"

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, answer: torch.Tensor):
        ops = self.ops
        if self.selected_dropout > 0 and self.model.config.attention == "nsa":
            off = torch.rand(inputs.shape[0], device=inputs.device) < self.selected_dropout  # [B]
            scale = torch.ones(inputs.shape[0], 1, 1, 3, device=inputs.device)  # gate multipliers (cmp, slc, win)
            scale[:, 0, 0, 1] = (~off).float()
            ops = _GateScaledOps(ops, scale)
        recorder = _RecordingOps(ops) if self.select_align_weight > 0 else None
        raw_keys = [] if recorder is not None and self.compressor_only else None
        with _keeping_compressor_inputs(self.model, raw_keys):
            logits = forward_logits(self.model, inputs, recorder or ops)  # [B, T, V]
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
        weights = 1.0 + (self.answer_weight - 1.0) * answer.float()
        if self.first_answer_weight is not None:
            first = answer & ~F.pad(answer[:, :-1], (1, 0))  # answer targets whose previous target is not one
            weights = torch.where(first, self.first_answer_weight, weights)
        loss = (ce * weights).sum() / weights.sum()
        align = loss.new_zeros(())
        if recorder is not None:
            config = self.model.config
            positions = selection_alignment.sample_positions(
                answer, self.select_align_queries, first=selection_alignment.first_ranked_position(config))
            layers = recorder.calls
            if raw_keys is not None:  # the compressors alone: the same keys, from raw keys without their graph
                layers = [(q.detach(), k, layer.attn.compress_keys(k_raw.detach()))
                          for (q, k, _), k_raw, layer in zip(layers, raw_keys, self.model.layers, strict=True)]
            align = torch.stack([selection_alignment.selection_alignment_loss(q, k, k_cmp, positions, config=config)
                                 for q, k, k_cmp in layers]).mean()
            loss = loss + self.select_align_weight * align
        with torch.no_grad():
            text_loss = ce[~answer].mean()
            hits = (logits.argmax(-1) == targets) & answer
            answer_acc = hits.sum() / answer.sum().clamp_min(1)
        return loss, text_loss, answer_acc, align.detach()


class _GateScaledOps:
    """An `ops` object whose nsa_attention multiplies the gates [B, T, HQ, 3] by scale [B, 1, 1, 3] first."""

    def __init__(self, ops, scale: torch.Tensor) -> None:
        self.ops = ops
        self.scale = scale

    def nsa_attention(self, q, k, v, k_cmp, v_cmp, gates, **kwargs):
        return self.ops.nsa_attention(q, k, v, k_cmp, v_cmp, gates * self.scale.to(gates.dtype), **kwargs)


class _RecordingOps:
    """An `ops` object that keeps each layer's (q, k, k_cmp), graph included, for the selection-alignment loss."""

    def __init__(self, ops) -> None:
        self.ops = ops
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def nsa_attention(self, q, k, v, k_cmp, v_cmp, gates, **kwargs):
        self.calls.append((q, k, k_cmp))
        return self.ops.nsa_attention(q, k, v, k_cmp, v_cmp, gates, **kwargs)


def attention_ops(recipe: Recipe, device: torch.device):
    """The NSA implementation a training step runs on."""
    path = recipe.attention_path
    if path == "auto":
        path = "flex" if device.type == "cuda" else "reference"
    if path == "reference":
        return reference, "reference"
    if device.type != "cuda":
        raise ValueError("attention_path 'flex' needs a CUDA device: FlexAttention has no CPU backward")
    import kernels

    from .train_attention import FlexNSA

    # Selection through the Triton kernel where it runs this config (autocast makes q bfloat16).
    triton_select, _ = kernels.supports(recipe.config, device=device, dtype=torch.bfloat16)
    return FlexNSA(compile=True, triton_select=triton_select), "flex + triton select" if triton_select else "flex"


@dataclass
class TrainResult:
    model: NSALM  # the final weights, rounded to save_dtype and back, in eval mode
    metrics: dict[str, Any]
    recipe: Recipe  # with max_steps as actually fixed
    out_dir: Path


def train(recipe: Recipe, out_dir: str | Path, *, device: str | torch.device | None = None, resume: bool = False,
          progress: bool = True, corpus_root: str | Path | None = None, stop_after: int | None = None,
          stop_after_s: float | None = None) -> TrainResult:
    """Train per recipe into out_dir (see the module docstring); returns the model and its metrics.

    stop_after / stop_after_s: leave after this many steps / seconds of this call with the state saved
    (no evaluation, no checkpoint), for runs split over several machine sessions; `resume=True`
    continues it.
    corpus_root: the standard-library folder to read (default: this Python's).
    """
    out_dir = Path(out_dir)
    if recipe.init_from is not None and not resume:
        _check_init_from(recipe)  # a missing or mismatched checkpoint fails before any process group or file
    _check_trainable(recipe)
    world, rank, local_rank = _init_distributed()
    device = torch.device(device) if device is not None else _default_device(local_rank)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(recipe.seed)
    model = NSALM(recipe.config)
    # The init_from weights, read once: where a fresh run starts, and what init_decay pulls toward (also
    # when resuming, whose weights come from the saved state).
    start = (load_pretrained(recipe.init_from, dtype=torch.float32).state_dict()
             if recipe.init_from is not None and (not resume or recipe.init_decay) else None)
    if start is not None and not resume:
        model.load_state_dict(start)
    else:
        model.reset_parameters(seed=recipe.seed)
    model.to(device).train()
    trained = _trained_parameters(model, recipe.trainable)  # before DDP, which hooks the trained ones only
    anchors = [(p, start[name].to(device)) for name, p in trained] if recipe.init_decay else []
    ops, path_name = attention_ops(recipe, device)
    loss_module = TrainingLoss(model, ops, recipe)
    step_module = nn.parallel.DistributedDataParallel(loss_module, device_ids=[device] if device.type == "cuda"
                                                      else None) if world > 1 else loss_module
    decay = [p for n, p in trained if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in trained if p.dim() < 2 or "embed" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")

    start_step, max_steps, tokens, elapsed_before, earned_stage = 0, recipe.max_steps, 0, 0.0, 0
    stage_starts: list[int] = []  # the step each stage after the first began in this run
    state_path = out_dir / STATE_FILE
    corpus_info = data.corpus_summary(corpus_root, heldout_fraction=recipe.heldout_fraction)
    if is_main:
        print(f"{recipe.name}: text from {data.describe_corpus(corpus_info)}", file=sys.stderr, flush=True)
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume: no {STATE_FILE} in {out_dir}")
        state = torch.load(state_path, map_location=device, weights_only=True)
        if state.get("corpus_sha256", corpus_info["sha256"]) != corpus_info["sha256"]:
            raise ValueError(f"--resume: the run began on other text than {corpus_info['root']} holds now (SHA-256 "
                             f"{state['corpus_sha256'][:12]}, here {corpus_info['sha256'][:12]}); pass the "
                             "--corpus-root it began with")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, max_steps = int(state["step"]), int(state["max_steps"])
        tokens, elapsed_before = int(state["tokens"]), float(state["elapsed_s"])
        earned_stage = int(state["stage"])
        stage_starts = [int(x) for x in state["stage_starts"]]

    corpus = data.stdlib_corpus("train", heldout_fraction=recipe.heldout_fraction, root=corpus_root)
    mix = recipe.task_mix
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _no_autocast()
    log = (out_dir / LOG_FILE).open("a", encoding="utf-8") if is_main else None
    bar = _progress_bar(progress and is_main, start_step, max_steps, recipe.name)
    calibrated = recipe.time_budget_s is None or resume
    step_times: list[float] = []
    t0 = time.perf_counter()
    gate_history: list[float] = []
    recent_acc: list[float] = []  # answer accuracy (all processes) of the last GATE_LOGS logged steps of this stage
    def heldout_ids() -> torch.Tensor:  # the held-out rows of the periodic and the final evaluation
        corpus = data.stdlib_corpus("heldout", heldout_fraction=recipe.heldout_fraction, root=corpus_root)
        return data.heldout_rows(corpus, seq_len=recipe.seq_len, rows=recipe.eval_rows)

    eval_ids = heldout_ids() if recipe.eval_every is not None and is_main else None
    step = start_step
    while step < max_steps and (stop_after is None or step - start_step < stop_after):
        if stop_after_s is not None and _any_rank(time.perf_counter() - t0 >= stop_after_s, world, device):
            break
        t_step = time.perf_counter()
        if recipe.stage_starts is None:
            stage = mix.stage_at(step / max_steps, earned_stage)
        else:
            stage = min(bisect.bisect_right(recipe.stage_starts, step), len(mix.stage_lengths) - 1)
        if stage > len(stage_starts):
            if recent_acc and log is not None:
                # How ready the run was for harder tasks: a replayed stage_starts moves on whether or not this
                # run has learned the earlier stages (another text or process layout changes when a run learns).
                ready = sum(recent_acc) / len(recent_acc)
                log.write(json.dumps({"step": step, "stage_began": stage, "max_task_len": mix.max_task_len(stage),
                                      "answer_acc_before": round(ready, 4)}) + "\n")
                _say(bar, f"{recipe.name}: stage {stage} (tasks up to {mix.max_task_len(stage)} tokens) from step "
                          f"{step}, answer accuracy before it {ready:.2f}")
            recent_acc.clear()
        stage_starts += [step] * (stage - len(stage_starts))
        inputs, targets, answer = data.training_batch(corpus, mix, batch_size=recipe.batch_size, stage=stage,
                                                      seed=recipe.seed, rank=rank, step=step)
        inputs, targets, answer = (x.to(device, non_blocking=True) for x in (inputs, targets, answer))
        lr = lr_at(recipe, step, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            loss, text_loss, answer_acc, align_loss = step_module(inputs, targets, answer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        if anchors:
            with torch.no_grad():
                for param, anchor in anchors:
                    param.lerp_(anchor, lr * recipe.init_decay)
        step += 1
        tokens += inputs.numel() * world
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - t_step)
        if not calibrated and len(step_times) == recipe.calibrate_steps + 2:
            max_steps = _fit_steps(recipe, step, max_steps, step_times[2:], time.perf_counter() - t0, world)
            calibrated = True
            if bar is not None:
                bar.total = max_steps
                bar.refresh()
        if step % recipe.log_every == 0 or step == max_steps:
            global_acc = _mean_over_ranks(answer_acc.detach(), world)
            recent_acc[:] = (recent_acc + [global_acc])[-GATE_LOGS:]
            if recipe.stage_starts is None:
                earned_stage = _gate(recipe.curriculum_gate, gate_history, global_acc, stage, earned_stage)
            record = {"step": step, "loss": round(loss.item(), 4), "text_loss": round(text_loss.item(), 4),
                      "answer_acc": round(answer_acc.item(), 4), "lr": lr, "grad_norm": round(grad_norm.item(), 4),
                      "tokens": tokens, "stage": stage, "max_task_len": mix.max_task_len(stage),
                      "tokens_per_s": round(inputs.numel() * world / step_times[-1]),
                      "elapsed_s": round(elapsed_before + time.perf_counter() - t0, 2)}
            if recipe.select_align_weight > 0:
                record["align_loss"] = round(align_loss.item(), 4)
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if bar is not None:
                bar.set_postfix(loss=record["loss"], acc=record["answer_acc"], tok_s=record["tokens_per_s"])
        if bar is not None:
            bar.update(1)
        if step % recipe.ckpt_every == 0 and is_main:
            elapsed = elapsed_before + time.perf_counter() - t0
            _save_state(state_path, model, optimizer, step, max_steps, tokens, elapsed, earned_stage, stage_starts,
                        corpus_info["sha256"])
        if eval_ids is not None and step % recipe.eval_every == 0 and step < max_steps:
            # Rank 0 alone: the others wait for it at the next step's gradient all-reduce.
            loss_now = heldout_loss(model.eval(), eval_ids)
            model.train()
            log.write(json.dumps({"step": step, "heldout_loss": round(loss_now, 5)}) + "\n")
            log.flush()
    train_seconds = elapsed_before + time.perf_counter() - t0
    replicas_identical = _replicas_identical(model) if world > 1 else None
    if bar is not None:
        bar.close()
    if log is not None:
        log.close()
    final = recipe.replace(max_steps=max_steps, time_budget_s=None, stage_starts=stage_starts)
    if is_main:
        _save_state(state_path, model, optimizer, step, max_steps, tokens, train_seconds, earned_stage, stage_starts,
                    corpus_info["sha256"])
        (out_dir / RECIPE_FILE).write_text(final.to_json(), encoding="utf-8")
    if step < max_steps:  # stopped on request: the state is saved and --resume finishes the run
        return TrainResult(model.eval(), {}, final, out_dir)

    # The shipped weights are the save_dtype rounding of the trained ones: evaluate exactly those.
    model = _rounded(model, SAVE_DTYPES[recipe.save_dtype]).eval()
    metrics: dict[str, Any] = {}
    if is_main:
        metrics = {
            "attention": recipe.config.attention,
            "parameters": model.num_parameters(),
            **({"trained_parameters": sum(p.numel() for _, p in trained)} if recipe.trainable else {}),
            "steps": step,
            "tokens": tokens,
            "seq_len": recipe.seq_len,
            "train_seconds": round(train_seconds, 1),
            "tokens_per_s": round(tokens / max(train_seconds, 1e-9)),
            "world_size": world,
            **({"ddp_replicas_identical": replicas_identical} if world > 1 else {}),
            "device": _device_name(device),
            "attention_path": path_name if recipe.config.attention == "nsa" else "sdpa",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "corpus": corpus_info,
            "curriculum": _curriculum_kind(recipe),
            **heldout_metrics(model, eval_ids if eval_ids is not None else heldout_ids()),
        }
        shipped = _rounded(model, SAVE_DTYPES[recipe.save_dtype], keep=True)
        save_pretrained(shipped, out_dir, metrics=metrics, card=training_card(shipped, final, metrics))
    if world > 1:
        dist.barrier()
    return TrainResult(model, metrics, final, out_dir)


def evaluate_heldout(model: NSALM, corpus: np.ndarray, *, seq_len: int, rows: int) -> dict[str, float]:
    """Mean next-byte loss over `rows` evenly spaced held-out windows, through the model's own forward."""
    return heldout_metrics(model, data.heldout_rows(corpus, seq_len=seq_len, rows=rows))


def heldout_metrics(model: NSALM, ids: torch.Tensor) -> dict[str, float]:
    """The held-out loss of rows ids [R, T + 1] as metrics.json records it (nats and bits per byte, tokens)."""
    loss = heldout_loss(model, ids)
    return {"heldout_loss_nats_per_byte": round(loss, 5), "heldout_bits_per_byte": round(loss / math.log(2), 5),
            "heldout_tokens": ids[:, 1:].numel()}


@torch.no_grad()
def heldout_loss(model: NSALM, ids: torch.Tensor) -> float:
    """Mean next-token loss (nats) over rows ids [R, T + 1], one row at a time (bf16 autocast on a GPU)."""
    total = 0.0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if model.device.type == "cuda" else _no_autocast()
    for row in ids.to(model.device):
        with autocast:
            logits = model(row[None, :-1], backend="reference")
        total += F.cross_entropy(logits[0], row[1:], reduction="sum").item()
    return total / ids[:, 1:].numel()


def training_card(model: NSALM, recipe: Recipe, metrics: dict[str, Any], *, niah_section: str = "",
                  command: str | None = None, base: tuple[Recipe, dict[str, Any], str] | None = None) -> str:
    """Model card: what the model is, the data, the command, the run, held-out loss, optional NIAH grid.

    base: (recipe, metrics, command) of the run whose weights this one started from (`init_from`),
    described as the first of two runs; its recipe ships as base_recipe.json.
    """
    is_nsa = recipe.config.attention == "nsa"
    kind = "Native Sparse Attention" if is_nsa else "dense causal attention (the NSA twin's control)"
    command = command or train_command(RECIPE_FILE, metrics, "<dir>")
    how = ("trained from scratch by `nsa-explorer train`." if base is None else
           "trained by `nsa-explorer train` in two runs: a base run from scratch, then a long-context run "
           "starting from its weights with a fresh optimizer.")
    runs = [f"Command: `{command}` (the recipe is `{RECIPE_FILE}` in this folder). {_run_summary(recipe, metrics)}"]
    if base is not None:
        base_recipe, base_metrics, base_command = base
        runs = [
            f"Base run: `{base_command}` (`{BASE_RECIPE_FILE}` in this folder). "
            f"{_task_summary(base_recipe, base_metrics)} "
            f"{_run_summary(base_recipe, base_metrics)} Held-out loss after it: "
            f"{base_metrics.get('heldout_loss_nats_per_byte')} nats per byte.",
            "",
            f"Long-context run: `{command}` (`{RECIPE_FILE}`; `init_from` names the base run's output). "
            f"{_run_summary(recipe, metrics)}"]
    description = "\n".join([
        f"A byte-level NSALM with {kind} in every layer, {how}",
        "",
        "## Data",
        "",
        f"The Python standard library's own `.py` files (sorted by path; a file is held out when the CRC32 of its "
        f"path falls in the lowest {recipe.heldout_fraction:.0%}): {_corpus_said(metrics)} Mixed with synthetic "
        f"passkey retrieval: a 5-digit key hidden at a random "
        f"depth of real text and asked for at the end (`{data.QUESTION}` then `<sep>`, the answer ends with `<eos>`), "
        f"{recipe.multi_key_prob:.0%} of tasks with 2-4 named keys"
        + (f", {recipe.start_needle_prob:.0%} of single-key tasks with the key right after `<bos>`"
           if recipe.start_needle_prob else "")
        + f". {_task_summary(recipe, metrics)}",
        "",
        "## Training",
        "",
        *runs,
        "",
        "## Held-out loss",
        "",
        f"{metrics.get('heldout_loss_nats_per_byte')} nats per byte ({metrics.get('heldout_bits_per_byte')} bits per "
        f"byte) over {metrics.get('heldout_tokens', 0):,} tokens of held-out files, in windows of {recipe.seq_len}.",
    ])
    if niah_section:
        description += "\n\n" + niah_section.strip()
    flat = {k: v for k, v in metrics.items() if not isinstance(v, dict | list)}
    return model_card(model, title=recipe.name, description=description, metrics=flat)


def _corpus_said(metrics: dict[str, Any]) -> str:
    """The card's sentence on the text a run read; runs from before corpus_summary name only the Python."""
    if "corpus" in metrics:
        return data.describe_corpus(metrics["corpus"])
    return f"those of Python {metrics.get('python', '')}, found through `sysconfig`."


def train_command(recipe_file: str, metrics: dict[str, Any], out: str) -> str:
    """The command that reruns a recorded run: its recipe fixes the step count and the stage starts, and its
    batch_size is per process, so the same rows need the same number of processes."""
    world = metrics.get("world_size", 1)
    launcher = f"torchrun --nproc_per_node={world} -m nsa_core.cli" if world > 1 else "nsa-explorer"
    return f"{launcher} train {recipe_file} --out {out}"


def _curriculum_kind(recipe: Recipe) -> str:
    """How the run's stages began: "replayed" (recipe.stage_starts), "gated" (answer accuracy, or the schedule
    at the latest) or "scheduled" (the schedule alone)."""
    if recipe.stage_starts is not None:
        return "replayed"
    return "gated" if recipe.curriculum_gate is not None else "scheduled"


def _task_summary(recipe: Recipe, metrics: dict[str, Any]) -> str:
    """How a run's rows were filled with tasks: the curriculum, or full length from the first step.

    recipe is the run's final one (stage_starts as they happened); metrics["curriculum"] says what set them,
    taken as "gated" for runs from before it was recorded."""
    if recipe.stage_starts and not any(recipe.stage_starts):
        return (f"Rows of {recipe.seq_len} tokens are packed with tasks of log-uniform length from "
                f"{recipe.min_task_len} to {recipe.seq_len} tokens from the first step.")
    starts = ", ".join(map(str, recipe.stage_starts or []))
    said = (f"Rows of {recipe.seq_len} tokens are packed with tasks whose longest length doubles in stages from "
            f"{recipe.min_task_len} to {recipe.seq_len} tokens")
    kind = metrics.get("curriculum", "gated")
    if kind == "replayed":
        return said + f", the stages beginning at steps {starts} as an earlier run recorded them (no accuracy gate)."
    if kind == "gated" and recipe.curriculum_gate is not None:
        said += (f", each stage entered once the answer accuracy reaches {recipe.curriculum_gate:.0%} and at the "
                 f"latest over the first {recipe.curriculum_frac:.0%} of training")
    else:
        said += f", the stages spread evenly over the first {recipe.curriculum_frac:.0%} of training"
    return said + (f"; the stages began at steps {starts}." if starts else ".")


def _run_summary(recipe: Recipe, metrics: dict[str, Any]) -> str:
    return (f"{metrics.get('steps')} steps of {recipe.batch_size} x {recipe.seq_len} tokens per process "
            f"({metrics.get('tokens', 0):,} tokens), {metrics.get('train_seconds')} s on {metrics.get('device')} "
            f"(world size {metrics.get('world_size')}, torch {metrics.get('torch')}, attention path "
            f"{metrics.get('attention_path')}). AdamW, lr {recipe.lr} with {recipe.warmup_steps} warm-up steps and "
            f"cosine decay to {recipe.min_lr_ratio} x, bf16 autocast on GPU; weights stored as {recipe.save_dtype}."
            + _what_trains(recipe, metrics))


def _what_trains(recipe: Recipe, metrics: dict[str, Any]) -> str:
    """The card's sentences on frozen weights, the pull toward the starting weights and the selection-alignment
    loss, "" for none."""
    said = ""
    if recipe.trainable:
        names = ", ".join(f"`{part}`" for part in recipe.trainable)
        said += (f" Only the weights whose names contain {names} train ({metrics.get('trained_parameters', 0):,} of "
                 f"{metrics.get('parameters', 0):,}); the others stay as the run started.")
    if recipe.init_decay:
        said += (f" After each step the trained weights move lr x {recipe.init_decay} of the way back to the "
                 "starting ones (`init_decay`).")
    if recipe.select_align_weight:
        through = ("the key compressors alone" if recipe.select_align_trains == "compressor"
                   else "the queries, keys and key compressors")
        said += (f" The loss adds {recipe.select_align_weight} x the selection-alignment loss: the block ranking "
                 f"trained, through {through}, toward dense attention's block mass at "
                 f"{recipe.select_align_queries} queries per row (`nsa_core/selection_alignment.py`).")
    return said


# helpers ---------------------------------------------------------------------------------------


def _fit_steps(recipe: Recipe, step: int, max_steps: int, timed: list[float], elapsed: float, world: int) -> int:
    """max_steps that fits the time budget at the measured seconds per step (the same on every rank)."""
    per_step = float(np.median(timed))
    fitted = step + int((recipe.time_budget_s - elapsed) / per_step)
    fitted = max(recipe.warmup_steps + 1, min(max_steps, fitted))
    if world > 1:
        t = torch.tensor([fitted], dtype=torch.long, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        fitted = int(t.item())
    return fitted


GATE_LOGS = 3  # logged steps whose mean answer accuracy the curriculum gate looks at


def _gate(threshold: float | None, history: list[float], accuracy: float, stage: int, earned: int) -> int:
    """The stage earned after one more logged accuracy at `stage`: one further once the last GATE_LOGS
    accuracies, all taken at the current stage, average at least `threshold`. history is updated in place."""
    if threshold is None:
        return earned
    if earned < stage:  # the schedule moved on: what was measured at the previous stage no longer counts
        history.clear()
        earned = stage
    history.append(accuracy)
    del history[:-GATE_LOGS]
    if len(history) == GATE_LOGS and sum(history) / GATE_LOGS >= threshold:
        history.clear()
        return stage + 1
    return earned


def _check_trainable(recipe: Recipe) -> None:
    """Raise unless every part of recipe.trainable names at least one parameter of the recipe's model."""
    if recipe.trainable is None:
        return
    with torch.device("meta"):
        names = [n for n, _ in NSALM(recipe.config).named_parameters()]
    unmatched = [part for part in recipe.trainable if not any(_trains([part], n) for n in names)]
    if unmatched:
        raise ValueError(f"trainable: {unmatched} name(s) no parameter; the parameters are {', '.join(names)}")


def _trains(trainable: list[str] | None, name: str) -> bool:
    """Whether a run with this `trainable` trains the parameter called name."""
    return trainable is None or any(part in name for part in trainable)


def _trained_parameters(model: NSALM, trainable: list[str] | None) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the parameters a run trains; the others are frozen (requires_grad off)."""
    for name, p in model.named_parameters():
        p.requires_grad_(_trains(trainable, name))
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _check_init_from(recipe: Recipe) -> None:
    """Raise unless recipe.init_from is a checkpoint with the recipe's configuration (no weights read);
    only INIT_FROM_MAY_DIFFER may differ."""
    theirs, ours = read_config(recipe.init_from).to_dict(), recipe.config.to_dict()
    for name in INIT_FROM_MAY_DIFFER:
        theirs[name] = ours[name]
    if theirs != ours:
        diff = {k: (theirs[k], ours[k]) for k in sorted(ours) if theirs[k] != ours[k]}
        raise ValueError(f"init_from {recipe.init_from}: its config differs from the recipe's model "
                         f"(field: (checkpoint, recipe)): {diff}")


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.float().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world
    return float(value.item())


def _any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """Whether flag holds on any process, so that every process leaves the loop at the same step."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _replicas_identical(model: NSALM) -> bool:
    """Whether every rank holds bit-identical weights (DDP's promise), checked against rank 0's."""
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    same = torch.tensor([1.0 if torch.equal(flat, ref) else 0.0], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item() == 1.0)


def _rounded(model: NSALM, dtype: torch.dtype, keep: bool = False) -> NSALM:
    """A copy of model with weights rounded to dtype (kept in dtype when keep, else back to float32)."""
    copy = NSALM(model.config).to(model.device)
    copy.load_state_dict({k: v.to(dtype) if keep else v.to(dtype).float() for k, v in model.state_dict().items()})
    return copy.to(dtype) if keep else copy


def _save_state(path: Path, model, optimizer, step, max_steps, tokens, elapsed, stage, stage_starts,
                corpus_sha256: str) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "max_steps": max_steps, "tokens": tokens, "elapsed_s": elapsed, "stage": stage,
                "stage_starts": torch.tensor(stage_starts, dtype=torch.long), "corpus_sha256": corpus_sha256}, tmp)
    os.replace(tmp, path)


def _init_distributed() -> tuple[int, int, int]:
    """(world size, rank, local rank); joins the process group torchrun describes through the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 1, 0, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world, dist.get_rank(), local_rank


def _default_device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"


class _no_autocast:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _say(bar, message: str) -> None:
    """A line on stderr that leaves the progress bar, if any, intact."""
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def _progress_bar(enabled: bool, start: int, total: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"train {name}", unit="step", dynamic_ncols=True)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nsa-explorer train", description="Train an NSALM from a recipe.")
    parser.add_argument("recipe", type=Path, help="recipe JSON (see nsa_core/training.py: Recipe)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (checkpoint, logs, state)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the local GPU if any)")
    parser.add_argument("--resume", action="store_true", help=f"continue from {STATE_FILE} in --out")
    parser.add_argument("--max-steps", type=int, help="override the recipe's max_steps")
    parser.add_argument("--time-budget", type=float, help="override the recipe's time_budget_s (seconds)")
    parser.add_argument("--init-from", help="override the recipe's init_from (checkpoint directory)")
    parser.add_argument("--stop-after-s", type=float,
                        help="leave after this many seconds with the state saved; --resume continues")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--corpus-root", type=Path, help="standard-library folder to read (default: this Python's)")
    args = parser.parse_args(argv)
    try:
        recipe = Recipe.load(args.recipe)
        changes: dict[str, Any] = {}
        if args.max_steps is not None:
            changes["max_steps"] = args.max_steps
        if args.time_budget is not None:
            changes["time_budget_s"] = args.time_budget
        if args.init_from is not None:
            changes["init_from"] = args.init_from
        recipe = recipe.replace(**changes)
        if recipe.init_from is not None and not args.resume:
            _check_init_from(recipe)  # as train() does first, but reported as a usage error (exit 2)
    except (OSError, ValueError) as err:
        print(f"nsa-explorer train: {err}", file=sys.stderr)
        return 2
    result = train(recipe, args.out, device=args.device, resume=args.resume, progress=not args.no_progress,
                   corpus_root=args.corpus_root, stop_after_s=args.stop_after_s)
    if result.metrics:
        print(json.dumps({k: result.metrics[k] for k in ("steps", "tokens", "train_seconds",
                                                          "heldout_loss_nats_per_byte")}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
