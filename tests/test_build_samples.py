"""sample_models/build_samples.py: the dense twin's recipe written from a finished NSA run."""

import json
from pathlib import Path

import pytest

from nsa_core.training import RECIPE_FILE, Recipe

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
                 eval_every=100)
    finished_run(tmp_path / "nsa-tiny", nsa, world_size=2)  # a global batch of 4 rows
    # nsa-base has not finished (no folder): its twin is skipped, the long-context one is still written.
    assert build_samples.main(["twin", "--work", str(tmp_path), "--world", "4"]) == 0

    dense = Recipe.load(tmp_path / "dense-tiny.recipe.json")
    assert dense.config.attention == "dense" and dense.model == {**nsa.model, "attention": "dense"}
    assert dense.trainable == [".attn."]
    assert dense.batch_size == 1  # 4 rows over 4 processes
    assert dense.init_from == str(tmp_path / "dense-base")
    assert not (tmp_path / "dense-base.recipe.json").exists()
    # Everything that decides the rows and the schedule is the NSA run's.
    same = {"name", "model", "batch_size", "init_from"}
    for field in Recipe.__dataclass_fields__:
        if field not in same:
            assert getattr(dense, field) == getattr(nsa, field), field


def test_twin_refuses_a_global_batch_that_does_not_split(build_samples, tmp_path, capsys):
    recipe = Recipe(name="nsa-tiny", model={"attention": "nsa"}, seq_len=2048, batch_size=3, max_steps=10)
    finished_run(tmp_path / "nsa-tiny", recipe, world_size=1)
    assert build_samples.main(["twin", "--work", str(tmp_path), "--world", "2"]) == 1
    assert "does not split over 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "dense-tiny.recipe.json").exists()
