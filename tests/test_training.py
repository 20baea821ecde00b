"""`nsa-explorer train` on a CPU: recipes, the schedule, loss going down, resume, and DDP over gloo."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nsa_core import data, reference, selection_alignment, training
from nsa_core.checkpoint import load_pretrained
from nsa_core.model import NSALM

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = {"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1, "head_dim": 16, "v_head_dim": 16,
              "mlp_hidden": 64, "cmp_block": 16, "cmp_stride": 8, "slc_block": 16, "top_n": 3, "window": 32,
              "cmp_mlp_hidden": 8}


def tiny_recipe(**changes) -> training.Recipe:
    base = {"name": "tiny", "model": TINY_MODEL, "seq_len": 256, "batch_size": 1, "min_task_len": 256,
            "max_steps": 4, "warmup_steps": 1, "lr": 1e-2, "log_every": 1, "ckpt_every": 2, "eval_rows": 2,
            "heldout_fraction": 0.5, "save_dtype": "float32"}
    return training.Recipe(**(base | changes))


def test_recipe_round_trip_and_errors(tmp_path):
    recipe = tiny_recipe()
    path = tmp_path / "r.json"
    path.write_text(recipe.to_json())
    assert training.Recipe.load(path) == recipe
    path.write_text(json.dumps(json.loads(recipe.to_json()) | {"learning_rate": 1}))
    with pytest.raises(ValueError, match="unknown recipe key"):
        training.Recipe.load(path)
    with pytest.raises(ValueError, match="attention_path"):
        tiny_recipe(attention_path="fast")
    with pytest.raises(ValueError, match="n_head"):
        tiny_recipe(model=TINY_MODEL | {"n_head": 3, "n_kv_head": 2})
    with pytest.raises(ValueError, match="warmup_steps"):
        tiny_recipe(time_budget_s=10.0, calibrate_steps=5, warmup_steps=4)
    with pytest.raises(ValueError, match="selected_dropout"):
        tiny_recipe(selected_dropout=1.0)
    with pytest.raises(ValueError, match="first_answer_weight"):
        tiny_recipe(first_answer_weight=0.0)
    with pytest.raises(ValueError, match="select_align_weight"):
        tiny_recipe(select_align_weight=-0.1)
    with pytest.raises(ValueError, match="a dense model has none"):
        tiny_recipe(model=TINY_MODEL | {"attention": "dense"}, select_align_weight=0.5)
    with pytest.raises(ValueError, match="select_align_queries"):
        tiny_recipe(select_align_queries=0)
    with pytest.raises(ValueError, match="select_align_trains"):
        tiny_recipe(select_align_trains="queries")


def test_first_answer_weight_weighs_each_answers_first_token():
    recipe = tiny_recipe(answer_weight=3.0, first_answer_weight=10.0)
    torch.manual_seed(0)
    model = NSALM(recipe.config)
    loss_module = training.TrainingLoss(model, reference, recipe)
    inputs, targets = torch.randint(0, 256, (2, 2, 12))
    answer = torch.zeros(2, 12, dtype=torch.bool)
    answer[0, 3:6] = answer[0, 9:11] = answer[1, 0:2] = True  # two answers in row 0, one from the first target
    first = {(0, 3), (0, 9), (1, 0)}
    weights = torch.ones(2, 12)
    for b, t in answer.nonzero().tolist():
        weights[b, t] = 10.0 if (b, t) in first else 3.0
    with torch.no_grad():
        loss, *_ = loss_module(inputs, targets, answer)
        ce = torch.nn.functional.cross_entropy(model(inputs, backend="reference").flatten(0, 1), targets.flatten(),
                                               reduction="none").view(2, 12)
    assert loss.item() == pytest.approx(((ce * weights).sum() / weights.sum()).item(), rel=1e-5)


def test_selected_dropout_switches_the_selected_branch_off_in_whole_rows():
    """Rows drawn for dropout compute what the model computes with its selected gates shut; others are unchanged."""
    recipe = tiny_recipe(model=TINY_MODEL | {"top_n": 1, "local_blocks": 1, "init_blocks": 0}, selected_dropout=0.5)
    torch.manual_seed(0)
    model, shut = NSALM(recipe.config), NSALM(recipe.config)
    with torch.no_grad():
        for layer in model.layers:
            slc = torch.arange(1, layer.attn.gate.out_features, 3)  # gate outputs are (head, branch) flattened
            layer.attn.gate.bias[slc] = 3.0  # a selected branch with weight, so switching it off shows
        shut.load_state_dict(model.state_dict())
        for layer in shut.layers:
            layer.attn.gate.weight[slc] = 0.0
            layer.attn.gate.bias[slc] = -200.0  # sigmoid -> 0
    ids, targets = torch.randint(0, 256, (2, 8, 96))
    answer = torch.zeros(8, 96, dtype=torch.bool)
    with torch.no_grad():
        torch.manual_seed(1)
        off = torch.rand(8) < 0.5  # the rows the loss module draws after the same seed
        assert 0 < off.sum() < 8, "the seed must draw both kinds of rows"
        torch.manual_seed(1)
        loss, *_ = training.TrainingLoss(model, reference, recipe)(ids, targets, answer)
        logits = torch.where(off[:, None, None], shut(ids, backend="reference"), model(ids, backend="reference"))
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        unchanged = torch.nn.functional.cross_entropy(model(ids, backend="reference").flatten(0, 1), targets.flatten())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss.item() - unchanged.item()) > 2e-4  # far beyond the tolerance above


def test_selection_alignment_adds_its_weighted_loss_over_the_nsa_layers():
    recipe = tiny_recipe(model=TINY_MODEL | {"n_layer": 2}, select_align_weight=0.3, select_align_queries=5)
    torch.manual_seed(0)
    model = NSALM(recipe.config)
    ids, targets = torch.randint(0, 256, (2, 2, 200))
    answer = torch.zeros(2, 200, dtype=torch.bool)
    answer[0, 150:155] = answer[1, 60:65] = True
    with torch.no_grad():
        torch.manual_seed(1)
        loss, _, _, align = training.TrainingLoss(model, reference, recipe)(ids, targets, answer)
        plain, *_ = training.TrainingLoss(model, reference, recipe.replace(select_align_weight=0.0))(
            ids, targets, answer)
        torch.manual_seed(1)
        positions = selection_alignment.sample_positions(
            answer, 5, first=selection_alignment.first_ranked_position(recipe.config))
        per_layer = [selection_alignment.selection_alignment_loss(a.q, a.k, a.k_cmp, positions, config=recipe.config)
                     for a in (model.attention_inputs(ids, layer, backend="reference") for layer in range(2))]
    assert set(positions[0].tolist()) >= set(range(150, 155))  # the answer queries are among those used
    expected = torch.stack(per_layer).mean()
    assert align.item() == pytest.approx(expected.item(), rel=1e-5) and align.item() > 0
    assert loss.item() == pytest.approx(plain.item() + 0.3 * expected.item(), rel=1e-5)


@pytest.mark.parametrize("trains", ["all", "compressor"])
def test_selection_alignment_trains_what_the_recipe_says(trains):
    """The gradient the loss adds (with it minus without it) reaches the queries in "all" and only the key
    compressors in "compressor"; the loss's value is the same either way."""
    recipe = tiny_recipe(select_align_weight=0.5, select_align_queries=4)
    torch.manual_seed(0)
    model = NSALM(recipe.config)
    ids, targets = torch.randint(0, 256, (2, 2, 160))
    answer = torch.zeros(2, 160, dtype=torch.bool)
    answer[:, 120:125] = True
    names, params = zip(*model.named_parameters(), strict=True)

    def gradients(r):
        torch.manual_seed(1)
        loss, _, _, align = training.TrainingLoss(model, reference, r)(ids, targets, answer)
        return torch.autograd.grad(loss, params), align

    with_align, align = gradients(recipe.replace(select_align_trains=trains))
    without, _ = gradients(recipe.replace(select_align_weight=0.0))
    _, align_all = gradients(recipe)
    moved = {n for n, a, b in zip(names, with_align, without, strict=True) if not torch.allclose(a, b, atol=1e-9)}
    assert align.item() == pytest.approx(align_all.item(), rel=1e-6) and align.item() > 0
    if trains == "compressor":
        assert moved and all(".attn.k_compress." in n for n in moved)
    else:
        assert any(".attn.q_proj." in n for n in moved) and any(".attn.k_compress." in n for n in moved)


def test_a_run_with_selection_alignment_logs_it(tmp_path, corpus_root):
    recipe = tiny_recipe(max_steps=3, select_align_weight=1.0)
    training.train(recipe, tmp_path / "run", device="cpu", progress=False, corpus_root=corpus_root)
    log = [json.loads(line) for line in (tmp_path / "run" / training.LOG_FILE).read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    # A fresh model attends almost uniformly on both sides of the KL, so the loss starts near 0.
    assert len(steps) == 3 and all(0 <= r["align_loss"] < 0.5 for r in steps)
    assert "1.0 x the selection-alignment loss" in (tmp_path / "run" / "README.md").read_text()


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    recipe = tiny_recipe(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [training.lr_at(recipe, s, 100) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[100] == pytest.approx(0.1)


def test_time_budget_fixes_the_step_count():
    recipe = tiny_recipe(time_budget_s=10.0, warmup_steps=8, calibrate_steps=4, max_steps=1000)
    # 6 steps done in 2 s at 0.5 s per step: 16 more fit in the 8 s left.
    assert training._fit_steps(recipe, 6, 1000, [0.5] * 4, 2.0, world=1) == 22
    assert training._fit_steps(recipe, 6, 15, [0.5] * 4, 2.0, world=1) == 15  # never beyond max_steps


def test_curriculum_gate_advances_on_sustained_accuracy_only():
    history: list[float] = []
    earned = 0
    for acc in (0.95, 0.5, 0.95, 0.95):  # one bad log point in the last three holds the stage
        earned = training._gate(0.9, history, acc, stage=0, earned=earned)
        assert earned == 0
    assert training._gate(0.9, history, 0.95, stage=0, earned=earned) == 1 and history == []
    # What was measured before the schedule moved the run on does not count at the new stage.
    history[:] = [0.99, 0.99]
    assert training._gate(0.9, history, 0.99, stage=3, earned=1) == 3 and history == [0.99]
    assert training._gate(None, [], 1.0, stage=0, earned=0) == 0
    with pytest.raises(ValueError, match="curriculum_gate"):
        tiny_recipe(curriculum_gate=1.5)


def test_a_time_limit_leaves_with_the_state_saved(tmp_path, corpus_root):
    part = training.train(tiny_recipe(max_steps=4), tmp_path / "run", device="cpu", progress=False,
                          corpus_root=corpus_root, stop_after_s=0.0)
    assert part.metrics == {} and not (tmp_path / "run" / "model.safetensors").exists()
    state = torch.load(tmp_path / "run" / training.STATE_FILE, weights_only=True)
    assert state["step"] == 0 and state["stage"] == 0
    # Resuming on other text would silently change the run's data: refused.
    other = tmp_path / "other-stdlib"
    shutil.copytree(corpus_root, other)
    (other / "mod_00.py").write_text("x = 1\n" * 50)
    with pytest.raises(ValueError, match="--resume: the run began on other text"):
        training.train(tiny_recipe(max_steps=4), tmp_path / "run", device="cpu", progress=False,
                       corpus_root=other, resume=True)
    done = training.train(tiny_recipe(max_steps=4), tmp_path / "run", device="cpu", progress=False,
                          corpus_root=corpus_root, resume=True)
    assert done.metrics["steps"] == 4


def test_a_few_cpu_steps_lower_the_heldout_loss(tmp_path, corpus_root):
    recipe = tiny_recipe(max_steps=5)
    heldout = data.stdlib_corpus("heldout", heldout_fraction=0.5, root=corpus_root)
    untrained = training._rounded(NSALM(recipe.config), torch.float32)
    untrained.reset_parameters(seed=recipe.seed)
    before = training.evaluate_heldout(untrained.eval(), heldout, seq_len=256, rows=2)
    result = training.train(recipe, tmp_path / "run", device="cpu", progress=False, corpus_root=corpus_root)
    after = result.metrics["heldout_loss_nats_per_byte"]
    assert after < before["heldout_loss_nats_per_byte"] - 0.5
    # The metrics and the card say which text the run read.
    assert result.metrics["corpus"] == data.corpus_summary(corpus_root, heldout_fraction=0.5)
    card = (tmp_path / "run" / "README.md").read_text()
    assert data.describe_corpus(result.metrics["corpus"]) in card
    assert result.metrics["curriculum"] == "gated" and "each stage entered once the answer accuracy reaches 90%" in card
    log = [json.loads(line) for line in (tmp_path / "run" / training.LOG_FILE).read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5] and steps[-1]["tokens"] == 5 * 256
    # The checkpoint written next to the recipe loads strictly and gives the evaluated weights.
    loaded = load_pretrained(tmp_path / "run")
    assert torch.equal(loaded.lm_head.weight, result.model.lm_head.weight)
    # The recipe written back records when each curriculum stage began, so a rerun sees the same data.
    written = training.Recipe.load(tmp_path / "run" / training.RECIPE_FILE)
    assert written == recipe.replace(stage_starts=written.stage_starts) and written.stage_starts == [1]


def test_each_stage_begun_logs_the_answer_accuracy_reached_before_it(tmp_path, corpus_root, capsys):
    # A replayed curriculum moves on at its recorded steps whatever this run has learned; the log says how far
    # it had got, from the logged steps of the stage it leaves.
    training.train(tiny_recipe(max_steps=4, stage_starts=[3]), tmp_path / "late", device="cpu", progress=False,
                   corpus_root=corpus_root)
    log = [json.loads(line) for line in (tmp_path / "late" / training.LOG_FILE).read_text().splitlines()]
    began = [r for r in log if "stage_began" in r]
    assert [(r["step"], r["stage_began"], r["max_task_len"]) for r in began] == [(3, 1, 257)]
    before = [r["answer_acc"] for r in log if "loss" in r and r["step"] <= 3]
    assert began[0]["answer_acc_before"] == pytest.approx(sum(before) / 3, abs=1e-4)
    assert (f"tiny: stage 1 (tasks up to 257 tokens) from step 3, answer accuracy before it "
            f"{began[0]['answer_acc_before']:.2f}") in capsys.readouterr().err
    # Its card does not claim the gate it did not use.
    card = (tmp_path / "late" / "README.md").read_text()
    assert "the stages beginning at steps 3 as an earlier run recorded them (no accuracy gate)" in card
    assert "answer accuracy reaches" not in card
    # Without the gate the card says the schedule alone set the stages.
    card = training._task_summary(tiny_recipe(curriculum_gate=None), {"curriculum": "scheduled"})
    assert "the stages spread evenly over the first 40% of training." in card and "accuracy" not in card
    # A stage begun before any step was logged (a long-context run from step 0) has nothing to report.
    training.train(tiny_recipe(max_steps=2, stage_starts=[0]), tmp_path / "now", device="cpu", progress=False,
                   corpus_root=corpus_root)
    assert "stage_began" not in (tmp_path / "now" / training.LOG_FILE).read_text()


def test_periodic_heldout_loss_is_logged_for_the_weights_of_that_step(tmp_path, corpus_root):
    recipe = tiny_recipe(max_steps=5, eval_every=2)
    training.train(recipe, tmp_path / "run", device="cpu", progress=False, corpus_root=corpus_root, stop_after=4)
    log = [json.loads(line) for line in (tmp_path / "run" / training.LOG_FILE).read_text().splitlines()]
    evals = [r for r in log if "heldout_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    # The state saved on leaving holds the step-4 weights: the logged loss is theirs.
    state = torch.load(tmp_path / "run" / training.STATE_FILE, weights_only=True)
    model = NSALM(recipe.config)
    model.load_state_dict(state["model"])
    ids = data.heldout_rows(data.stdlib_corpus("heldout", heldout_fraction=0.5, root=corpus_root), seq_len=256, rows=2)
    assert evals[1]["heldout_loss"] == pytest.approx(training.heldout_loss(model.eval(), ids), abs=1e-5)
    assert evals[1]["heldout_loss"] < evals[0]["heldout_loss"]
    with pytest.raises(ValueError, match="eval_every"):
        tiny_recipe(eval_every=0)


def test_trainable_freezes_every_other_parameter(tmp_path, corpus_root):
    recipe = tiny_recipe(max_steps=3, trainable=[".attn."])
    start = NSALM(recipe.config)
    start.reset_parameters(seed=recipe.seed)
    result = training.train(recipe, tmp_path / "run", device="cpu", progress=False, corpus_root=corpus_root)
    after = dict(result.model.named_parameters())
    for name, p in start.named_parameters():
        if ".attn." in name:
            assert not torch.equal(after[name], p), f"{name} did not train"
        else:
            assert torch.equal(after[name], p), f"{name} changed although frozen"
    attn = sum(p.numel() for name, p in start.named_parameters() if ".attn." in name)
    assert result.metrics["trained_parameters"] == attn < result.metrics["parameters"]
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"Only the weights whose names contain `.attn.` train ({attn:,} of {result.metrics['parameters']:,})" in card
    with pytest.raises(ValueError, match=r"\['mlp_typo'\] name\(s\) no parameter"):
        training.train(tiny_recipe(trainable=["mlp_typo"]), tmp_path / "bad", device="cpu", progress=False,
                       corpus_root=corpus_root)
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="trainable"):
        tiny_recipe(trainable=[])


def test_init_decay_pulls_each_step_back_toward_the_starting_weights(tmp_path, corpus_root):
    """After a step, a run with init_decay holds the plain run's weights moved lr * init_decay of the way
    back to the init_from weights (every trained one; frozen ones stay put), and it resumes the same."""
    base = training.train(tiny_recipe(max_steps=2), tmp_path / "base", device="cpu", progress=False,
                          corpus_root=corpus_root)
    start = dict(base.model.named_parameters())
    common = {"init_from": str(tmp_path / "base"), "seed": 3, "trainable": [".attn.", "mlp"]}
    plain = training.train(tiny_recipe(**common), tmp_path / "plain", device="cpu", progress=False,
                           corpus_root=corpus_root, stop_after=1)
    recipe = tiny_recipe(**common, init_decay=30.0)
    pulled = training.train(recipe, tmp_path / "pulled", device="cpu", progress=False, corpus_root=corpus_root,
                            stop_after=1)
    t = training.lr_at(recipe, 0, recipe.max_steps) * recipe.init_decay  # 0.3 of the way back
    after = dict(pulled.model.named_parameters())
    for name, p in plain.model.named_parameters():
        if any(part in name for part in common["trainable"]):
            assert not torch.equal(p, start[name]), f"{name} did not train"
            torch.testing.assert_close(after[name], torch.lerp(p, start[name], t), msg=name)
        else:
            assert torch.equal(after[name], start[name]), f"{name} changed although frozen"
    # Resuming decays toward the init_from weights again, not toward the state it resumes from.
    resumed = training.train(recipe, tmp_path / "pulled", device="cpu", progress=False, corpus_root=corpus_root,
                             resume=True, stop_after=1)
    whole = training.train(recipe, tmp_path / "whole", device="cpu", progress=False, corpus_root=corpus_root,
                           stop_after=2)
    for (name, a), b in zip(resumed.model.state_dict().items(), whole.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    card = training.training_card(pulled.model, recipe, {"parameters": 10, "trained_parameters": 4})
    assert "Only the weights whose names contain `.attn.`, `mlp` train (4 of 10)" in card
    assert "the trained weights move lr x 30.0 of the way back to the starting ones" in card
    for bad in ({"init_decay": -1.0, **common}, {"init_decay": 1.0}, {"init_decay": 200.0, **common}):
        with pytest.raises(ValueError, match="init_decay"):
            tiny_recipe(**bad)


def test_init_from_starts_at_a_checkpoints_weights(tmp_path, corpus_root):
    base = training.train(tiny_recipe(max_steps=2), tmp_path / "base", device="cpu", progress=False,
                          corpus_root=corpus_root)
    phase2 = tiny_recipe(init_from=str(tmp_path / "base"), seed=7)
    start = training.train(phase2, tmp_path / "ft", device="cpu", progress=False, corpus_root=corpus_root,
                           stop_after=0)
    for (name, a), b in zip(base.model.state_dict().items(), start.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the base's weights, not seed 7's initialisation
    bad = tmp_path / "bad.json"
    bad.write_text(tiny_recipe(model=TINY_MODEL | {"window": 64}).to_json())
    assert training.cli([str(bad), "--out", str(tmp_path / "bad"), "--init-from", str(tmp_path / "base")]) == 2
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    with pytest.raises(ValueError, match=r"window.*\(32, 64\)"):
        training.train(tiny_recipe(init_from=str(tmp_path / "base"), model=TINY_MODEL | {"window": 64}),
                       tmp_path / "bad", device="cpu", progress=False, corpus_root=corpus_root)
    # The selection rule is not part of what the weights mean: a second phase may train under the other one.
    free = tiny_recipe(init_from=str(tmp_path / "base"), model=TINY_MODEL | {"slc_scores": "free"})
    start = training.train(free, tmp_path / "free", device="cpu", progress=False, corpus_root=corpus_root,
                           stop_after=0)
    assert start.model.config.slc_scores == "free"


def test_resume_continues_the_same_run(tmp_path, corpus_root):
    # One thread: threaded CPU reductions differ run to run by ~1e-8, and Adam turns such noise on a
    # near-zero gradient (a compressor bias) into a full-size step, so two-thread runs do not compare.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_resume(tmp_path, corpus_root)
    finally:
        torch.set_num_threads(threads)


def _check_resume(tmp_path, corpus_root):
    recipe = tiny_recipe(max_steps=4)
    straight = training.train(recipe, tmp_path / "a", device="cpu", progress=False, corpus_root=corpus_root)
    part = training.train(recipe, tmp_path / "b", device="cpu", progress=False, corpus_root=corpus_root,
                          stop_after=2)
    assert part.metrics == {} and not (tmp_path / "b" / "model.safetensors").exists()
    resumed = training.train(recipe, tmp_path / "b", device="cpu", progress=False, corpus_root=corpus_root,
                             resume=True)
    assert resumed.metrics["steps"] == 4 and resumed.metrics["tokens"] == straight.metrics["tokens"]
    half = part.model.state_dict()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
    assert (half["lm_head.weight"] - straight.model.lm_head.weight).abs().max() > 1e-3  # the last 2 steps mattered
    with pytest.raises(FileNotFoundError, match="train_state.pt"):
        training.train(recipe, tmp_path / "c", device="cpu", progress=False, corpus_root=corpus_root, resume=True)


def test_ddp_with_two_gloo_processes(tmp_path, corpus_root):
    recipe_path = tmp_path / "recipe.json"
    recipe_path.write_text(tiny_recipe(max_steps=2).to_json())
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nsa_core.cli",
           "train", str(recipe_path), "--out", str(tmp_path / "ddp"), "--device", "cpu", "--no-progress",
           "--corpus-root", str(corpus_root)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ddp_replicas_identical"] is True
    # batch_size is per process: the card's command reruns the same rows on as many processes.
    assert "`torchrun --nproc_per_node=2 -m nsa_core.cli train recipe.json --out <dir>`" in (
        tmp_path / "ddp" / "README.md").read_text()
    assert metrics["tokens"] == 2 * 2 * 256  # both processes' rows count
    load_pretrained(tmp_path / "ddp")


def _flex_inputs(device, requires_grad, slc_scores="paper"):
    from nsa_core.config import NSAConfig

    config = NSAConfig(n_head=4, n_kv_head=2, head_dim=16, v_head_dim=16, cmp_block=16, cmp_stride=8, slc_block=32,
                       top_n=4, window=48, slc_scores=slc_scores)
    B, T, Tc = 2, 160, (160 - 16) // 8 + 1  # rows of a batch select their blocks apart
    shapes = [(B, T, 4, 16), (B, T, 2, 16), (B, T, 2, 16), (B, Tc, 2, 16), (B, Tc, 2, 16)]
    inputs = [torch.randn(s, device=device, requires_grad=requires_grad) for s in shapes]
    inputs.append(torch.rand(B, T, 4, 3, device=device, requires_grad=requires_grad))
    return config, inputs


@torch.no_grad()
@pytest.mark.parametrize("slc_scores", ["paper", "free"])
@pytest.mark.parametrize("triton_select", [False, True], ids=["reference-select", "triton-select"])
def test_flex_attention_path_matches_the_reference_forward(triton_select, slc_scores):
    from nsa_core import reference
    from nsa_core.train_attention import FlexNSA

    config, inputs = _flex_inputs("cpu", requires_grad=False, slc_scores=slc_scores)
    expected = reference.nsa_attention(*inputs, config=config)
    actual = FlexNSA(compile=False, triton_select=triton_select).nsa_attention(*inputs, config=config)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="whole sequences"):
        FlexNSA(compile=False).nsa_attention(*inputs, config=config, q_start=5)


@pytest.mark.gpu
@pytest.mark.parametrize("triton_select", [False, True], ids=["reference-select", "triton-select"])
def test_flex_attention_path_matches_the_reference_gradients(triton_select):
    from nsa_core import reference
    from nsa_core.train_attention import FlexNSA

    config, inputs = _flex_inputs("cuda", requires_grad=True)
    expected = reference.nsa_attention(*inputs, config=config)
    actual = FlexNSA(compile=True, triton_select=triton_select).nsa_attention(*inputs, config=config)
    weights = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad((actual * weights).sum(), inputs),
                    torch.autograd.grad((expected * weights).sum(), inputs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("slc_scores", ["paper", "free"])
def test_flex_attention_path_matches_the_reference_at_the_training_shape(slc_scores):
    # nsa-tiny's attention over 16k-token rows, two rows per process, as a base run trains it (float32 here,
    # so that what differs is the path, not the precision).
    from nsa_core.train_attention import FlexNSA

    config = load_pretrained(Path(__file__).parent.parent / "sample_models" / "nsa-tiny").config.replace(
        slc_scores=slc_scores)
    B, T, HQ, H, D = 2, 16384, config.n_head, config.n_kv_head, config.head_dim
    Tc = (T - config.cmp_block) // config.cmp_stride + 1
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(B, T, HQ, D), (B, T, H, D), (B, T, H, D), (B, Tc, H, D), (B, Tc, H, D)]
    inputs = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    inputs.append(torch.rand(B, T, HQ, 3, device="cuda", generator=g))
    parts = reference.nsa_attention(*inputs, config=config, return_parts=True)
    flex = FlexNSA(compile=True, triton_select=True)
    with torch.no_grad():
        o_cmp, lse = flex.compressed(*inputs[:1], *inputs[3:5], cmp_block=config.cmp_block,
                                     cmp_stride=config.cmp_stride, scale=D ** -0.5)
        block_idx = flex.select(inputs[0], inputs[3], lse, config=config, scale=D ** -0.5)
        out = flex.nsa_attention(*inputs, config=config)
    # The same blocks, as sets, for all but near-ties (each row of the batch on its own).
    same = (block_idx.sort(-1).values == parts.block_idx.sort(-1).values).all(-1)  # [B, T, H]
    assert same.float().mean((1, 2)).min() > 0.999
    # And the same output wherever every KV head of a query chose the same blocks.
    agree = same.all(-1)[:, :, None, None]
    torch.testing.assert_close(torch.where(agree, out, 0.0), torch.where(agree, parts.o, 0.0), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(o_cmp, parts.o_cmp, atol=1e-4, rtol=1e-3)
