"""sample_models/build_samples.py: the dense twin's recipe written from a finished NSA run, and every phase
after training on a CPU."""

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from nsa_core import data, training
from nsa_core.checkpoint import load_pretrained
from nsa_core.training import RECIPE_FILE, Recipe
from tests.test_training import TINY_MODEL

SCRIPT = Path(__file__).resolve().parent.parent / "sample_models" / "build_samples.py"


@pytest.fixture
def build_samples(import_script):
    return import_script(SCRIPT)


def finished_run(folder: Path, recipe: Recipe, world_size: int) -> None:
    folder.mkdir(parents=True)
    (folder / RECIPE_FILE).write_text(recipe.to_json(), encoding="utf-8")
    (folder / "metrics.json").write_text(json.dumps({"world_size": world_size}), encoding="utf-8")


def test_twin_recipe_switches_the_attention_and_nothing_else(build_samples, tmp_path):
    nsa = Recipe(name="nsa-tiny", model={"attention": "nsa", "rope_theta": 1e6}, seed=7, init_from="/runs/nsa-base",
                 seq_len=2048, batch_size=2, max_steps=300, stage_starts=[0, 120], trainable=[".attn."],
                 eval_every=100, select_align_weight=0.5)
    finished_run(tmp_path / "nsa-tiny", nsa, world_size=2)  # a global batch of 4 rows
    # nsa-base has not finished (no folder): its twin is skipped, the long-context one is still written.
    assert build_samples.main(["twin", "--work", str(tmp_path), "--world", "4"]) == 0

    dense = Recipe.load(tmp_path / "dense-tiny.recipe.json")
    assert dense.config.attention == "dense" and dense.model == {**nsa.model, "attention": "dense"}
    assert dense.trainable == [".attn."]
    assert dense.select_align_weight == 0.0  # NSA's block ranking: a dense model has none
    assert dense.batch_size == 1  # 4 rows over 4 processes
    assert dense.init_from == str(tmp_path / "dense-base")
    assert not (tmp_path / "dense-base.recipe.json").exists()
    # Everything that decides the rows and the schedule is the NSA run's.
    same = {"name", "model", "batch_size", "init_from", "select_align_weight"}
    for field in Recipe.__dataclass_fields__:
        if field not in same:
            assert getattr(dense, field) == getattr(nsa, field), field


def test_twin_refuses_a_global_batch_that_does_not_split(build_samples, tmp_path, capsys):
    recipe = Recipe(name="nsa-tiny", model={"attention": "nsa"}, seq_len=2048, batch_size=3, max_steps=10)
    finished_run(tmp_path / "nsa-tiny", recipe, world_size=1)
    assert build_samples.main(["twin", "--work", str(tmp_path), "--world", "2"]) == 1
    assert "does not split over 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "dense-tiny.recipe.json").exists()


def test_every_phase_after_training_builds_the_shipped_folders(build_samples, tmp_path, monkeypatch, corpus_root,
                                                               capsys):
    """Base and long-context NSA runs, the twins from their recipes, serve, NIAH and cards, on a CPU with a
    stand-in standard library: the packed folders load strictly and their cards describe both runs."""
    monkeypatch.setattr(data, "stdlib_root", lambda: corpus_root)
    work, out = tmp_path / "work", tmp_path / "out"
    base = Recipe(name="nsa-tiny", model=TINY_MODEL, seq_len=256, batch_size=1, min_task_len=256, max_steps=3,
                  warmup_steps=1, lr=1e-2, log_every=1, ckpt_every=2, eval_rows=2, heldout_fraction=0.5,
                  save_dtype="float32")
    training.train(base, work / "nsa-base", device="cpu", progress=False)
    long = base.replace(init_from=str(work / "nsa-base"), trainable=[".attn."], seed=5)
    training.train(long, work / "nsa-tiny", device="cpu", progress=False)
    assert build_samples.main(["twin", "--work", str(work)]) == 0
    for name in ("dense-base", "dense-tiny"):  # dense-tiny starts from dense-base's weights
        training.train(Recipe.load(work / f"{name}.recipe.json"), work / name, device="cpu", progress=False)
    # A phase on other text than the runs read is refused: the cards measure on the runs' own held-out files.
    other = tmp_path / "other-stdlib"
    shutil.copytree(corpus_root, other)
    (other / "mod_00.py").write_text("y = 2\n" * 30)
    assert build_samples.main(["serve", "--work", str(work), "--device", "cpu", "--corpus-root", str(other)]) == 1
    assert build_samples.main(["niah", "dense-tiny", "--work", str(work), "--device", "cpu",
                               "--corpus-root", str(other)]) == 1
    assert "Pass the run's --corpus-root" in capsys.readouterr().err
    assert build_samples.main(["serve", "--work", str(work), "--device", "cpu"]) == 0
    for name in build_samples.NAMES:
        assert build_samples.main(["niah", name, "--work", str(work), "--device", "cpu", "--lengths", "256",
                                   "--depths", "2", "--trials", "2"]) == 0
    assert build_samples.main(["cards", "--work", str(work), "--out", str(out)]) == 0

    for name in build_samples.NAMES:
        with tarfile.open(out / f"{name}.tar") as tar:
            tar.extractall(tmp_path / "shipped", filter="data")
        folder = tmp_path / "shipped" / name
        assert sorted(p.name for p in folder.iterdir()) == sorted(build_samples.SHIPPED)
        model = load_pretrained(folder)  # strict: every tensor matches the config
        assert model.config.slc_scores == build_samples.SERVED_SCORES.get(name, "paper")
        assert Recipe.load(folder / RECIPE_FILE).init_from == "base"
        assert Recipe.load(folder / RECIPE_FILE).trainable == [".attn."]  # the twin froze the same weights
        metrics = json.loads((folder / "metrics.json").read_text())
        # The grid's haystacks are the held-out files of the text the runs trained on.
        assert json.loads((folder / "niah.json").read_text())["haystack"] == metrics["corpus"]
        assert metrics["base"]["steps"] == 3 and metrics["niah_min_accuracy_per_length"].keys() == {"256"}
        card = (folder / "README.md").read_text()
        assert "Base run:" in card and "Long-context run:" in card and "--init-from base" in card
        assert f"### {build_samples.NAMES[1 - build_samples.NAMES.index(name)]} (the twin" in card
        assert f"Only the weights whose names contain `.attn.` train ({metrics['trained_parameters']:,}" in card
        assert ("## Selection scores" in card) == (name in build_samples.SERVED_SCORES)
    assert not (work / "nsa-tiny" / training.STATE_FILE).exists()
