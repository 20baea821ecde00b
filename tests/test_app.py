"""The Streamlit app under AppTest, on the CPU with the shipped sample model: every page renders,
widget flows work, injected chart selections drive the inspector and the zoom, uploads load or fail
cleanly; plus the launcher, the device choice and the live benchmark as plain functions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

from app import cache, live_bench
from nsa_core import checkpoint, launch, niah, reference, safe_paths
from nsa_core.config import NSAConfig
from nsa_core.model import NSALM

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app" / "streamlit_app.py")
TOKENS = 96  # short inputs keep every run on a 2-core CPU to a second or two


def _selection(points=(), box=()) -> dict:
    return {"selection": {"points": list(points), "point_indices": [], "box": list(box), "lasso": []}}


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.exception] + [str(e.value) for e in at.error]


@pytest.fixture
def at(monkeypatch) -> AppTest:
    """The app on its default page (Explorer) with a short source-file input, already run once."""
    monkeypatch.delenv(launch.ENV_CHECKPOINT, raising=False)
    monkeypatch.setenv(launch.ENV_DEVICE, "cpu")
    st.cache_data.clear()  # traces are per input; the cached models are shared, as in a real server
    app = AppTest.from_file(APP, default_timeout=120)
    app.session_state["max_tokens"] = TOKENS
    app.run()
    assert not _errors(app)
    return app


def _chart(at: AppTest, key: str):
    charts = [c for c in at.get("plotly_chart") if c.key == key]
    assert charts, f"no chart {key!r}; charts: {[c.key for c in at.get('plotly_chart')]}"
    return charts[0]


def test_every_page_renders_on_the_cpu_with_the_shipped_model(at):
    assert at.title[0].value == "Explorer"
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert cache.default_sample() in sidebar and "CPU" in sidebar
    assert {"atlas", "selmap", "importance", "pcmp", "gatebars", "denserow"} <= {c.key for c in at.get("plotly_chart")}
    for page, title in (
        ("views/model.py", "Model"),
        ("views/gates.py", "Gates"),
        ("views/needle.py", "Needle in a haystack"),
        ("views/performance.py", "Performance"),
        ("views/explorer.py", "Explorer"),
    ):
        at.switch_page(page).run()
        assert not _errors(at), page
        assert at.title[0].value == title


def test_a_click_on_the_selection_map_opens_that_query_in_the_inspector(at):
    at.session_state["selmap"] = _selection(points=[{"x": 10.0, "y": 40.0, "curve_number": 3}])
    at.run()
    assert not _errors(at)
    assert at.session_state["query"] == 40
    assert at.number_input(key="query").value == 40
    assert any(m.value.startswith("Query **40**") for m in at.markdown)
    assert at.query_params["query"] == "40"  # the permalink follows
    # 96 tokens lie in the forced blocks (initial and local), so under the shipped "free" scores no group votes.
    assert any("cast no vote at this query" in c.value for c in at.caption)
    # The inspector's dense row covers exactly keys 0..40.
    spec = _chart(at, "denserow").proto.spec
    assert '"range":[-0.5,40.5]' in spec.replace(" ", "")


def test_a_click_on_the_gate_atlas_picks_layer_and_head(at):
    at.session_state["atlas"] = _selection(points=[{"x": 5, "y": 2, "curve_number": 1}])
    at.run()
    assert not _errors(at)
    assert (at.selectbox(key="layer").value, at.selectbox(key="head").value) == (2, 5)
    assert at.query_params["layer"] == "2" and at.query_params["head"] == "5"
    assert "KV head **1**" in " ".join(m.value for m in at.markdown)  # 8 query heads over 2 KV heads: G = 4


def test_a_box_selection_zooms_the_map_and_reset_restores_it(at):
    at.session_state["selmap"] = _selection(box=[{"x": [-0.5, 47.5], "y": [31.5, 95.5]}])
    at.run()
    assert not _errors(at)
    assert at.session_state["zoom"].as_tuple() == (32, 96, 0, 48)
    assert at.query_params["zoom"] == "32,96,0,48"
    at.button(key="reset_zoom").click().run()
    assert at.session_state["zoom"] is None and "zoom" not in at.query_params


def test_nsa_against_dense_shows_recall_per_head(at):
    at.segmented_control(key="map_view").set_value("NSA vs dense").run()
    assert not _errors(at)
    spec = _chart(at, "recall").proto.spec
    assert "dense-mass recall" in spec
    # Short inputs sit inside the 512-token window, so NSA covers all of the dense mass.
    assert any("dense mass covered **100.0%**" in m.value for m in at.markdown)


def test_widget_flow_changes_the_input(at):
    at.segmented_control(key="text_kind").set_value("Paste").run()
    at.text_area(key="text_paste").input("a b c " * 40).run()
    assert not _errors(at)
    assert at.metric[0].value == str(TOKENS)  # cut to the token limit
    at.segmented_control(key="text_kind").set_value("Passkey prompt").run()
    assert not _errors(at)
    assert any("Hidden pass key" in c.value for c in at.caption)


def test_a_permalink_restores_the_view(monkeypatch):
    monkeypatch.setenv(launch.ENV_DEVICE, "cpu")
    app = AppTest.from_file(APP, default_timeout=120)
    for key, value in {
        "tokens": "80",
        "layer": "1",
        "head": "6",
        "query": "33",
        "ckpt": "sample:nsa-random",
        "zoom": "0,64,0,64",
        "head_bogus": "1",
    }.items():
        app.query_params[key] = value
    app.run()
    assert not _errors(app)
    assert (app.session_state["layer"], app.session_state["head"]) == (1, 3)  # nsa-random has 4 query heads
    assert app.session_state["query"] == 33 and app.metric[0].value == "80"
    assert "nsa-random" in " ".join(m.value for m in app.sidebar.markdown)


@pytest.mark.parametrize(
    ("ckpt", "message"),
    [
        ("path:/etc", "outside"),  # a folder outside the roots
        ("sample:nsa-random@scores=best", "selection rule is one of paper, free"),
    ],
)
def test_a_url_naming_what_cannot_open_is_refused_and_the_default_opens(monkeypatch, ckpt, message):
    monkeypatch.setenv(launch.ENV_DEVICE, "cpu")
    app = AppTest.from_file(APP, default_timeout=120)
    app.query_params["ckpt"] = ckpt
    app.query_params["tokens"] = "64"
    app.run()
    assert not app.exception
    assert any("Could not open checkpoint" in e.value and message in e.value for e in app.error)
    assert app.session_state["ckpt"] == cache.SAMPLE + cache.default_sample()
    assert app.title[0].value == "Explorer"


def test_the_selection_rule_switch_serves_the_checkpoint_under_the_other_rule(at):
    own = cache.SAMPLE + cache.default_sample()
    assert at.session_state["ckpt"] == own
    assert at.sidebar.radio(key="slc_pick").value == "free"  # nsa-tiny ships with the "free" rule
    at.sidebar.radio(key="slc_pick").set_value("paper").run()
    assert not _errors(at)
    assert at.session_state["ckpt"] == own + cache.SCORES + "paper"
    assert "paper scores" in " ".join(m.value for m in at.sidebar.markdown)
    served = cache.load_model(at.session_state["ckpt"], "cpu", "float32").model
    shipped = cache.load_model(own, "cpu", "float32").model
    assert served.config == shipped.config.replace(slc_scores="paper")
    assert all(torch.equal(a, b) for a, b in zip(served.parameters(), shipped.parameters(), strict=True))
    assert cache.recorded_niah(own) is not None and cache.recorded_niah(at.session_state["ckpt"]) is None
    at.switch_page("views/model.py").run()
    assert not _errors(at) and at.query_params["ckpt"] == own + cache.SCORES + "paper"
    assert at.sidebar.radio(key="slc_pick").value == "paper"
    at.sidebar.radio(key="slc_pick").set_value("free").run()  # its own rule again: the plain source
    assert not _errors(at) and at.session_state["ckpt"] == own and at.query_params["ckpt"] == own


# A one-layer model small enough to build, save and run in well under a second.
TINY_CONFIG = NSAConfig(
    d_model=32,
    n_layer=1,
    n_head=2,
    n_kv_head=1,
    head_dim=16,
    v_head_dim=16,
    mlp_hidden=64,
    cmp_block=16,
    cmp_stride=8,
    slc_block=16,
    top_n=4,
    window=32,
    cmp_mlp_hidden=16,
)


def _tiny_checkpoint_bytes(tmp_path: Path) -> bytes:
    config = TINY_CONFIG
    path = checkpoint.save_single_file(NSALM(config), tmp_path / "tiny.safetensors")
    return path.read_bytes()


def test_an_uploaded_checkpoint_opens_and_a_bad_upload_leaves_the_app_running(at, tmp_path):
    at.switch_page("views/model.py").run()
    at.file_uploader(key="upload_pick").set_value(
        ("tiny.safetensors", _tiny_checkpoint_bytes(tmp_path), "application/octet-stream")
    ).run()
    assert not _errors(at)
    assert at.session_state["ckpt"].startswith(cache.UPLOAD)
    assert "1 layers · 2 query heads" in " ".join(m.value for m in at.sidebar.markdown)
    good = at.session_state["ckpt"]

    at.file_uploader(key="upload_pick").set_value(
        ("bad.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{not json", "application/octet-stream")
    ).run()
    assert not at.exception
    assert any("Could not open checkpoint" in e.value for e in at.error)
    assert at.session_state["ckpt"] == good  # still on the model that worked
    at.switch_page("views/explorer.py").run()
    assert not _errors(at) and at.title[0].value == "Explorer"


def test_the_server_path_picker_only_opens_checkpoints_under_the_roots(at):
    at.switch_page("views/model.py").run()
    at.text_input(key="path_pick").input("../../etc/passwd").run()
    at.button(key="open_path").click().run()
    assert not at.exception and at.error
    found = at.selectbox(key="path_found").options
    assert any("nsa-random" in option for option in found)
    at.text_input(key="path_pick").input(str(ROOT / "sample_models" / "nsa-random")).run()
    at.button(key="open_path").click().run()
    assert not _errors(at)
    assert at.session_state["ckpt"] == cache.PATH + str((ROOT / "sample_models" / "nsa-random").resolve())


def test_the_needle_demo_answers_and_reports_the_needle_block(at):
    at.switch_page("views/needle.py")
    at.session_state["len"] = 256
    at.run()
    at.button(key="ask").click().run()
    assert not _errors(at)
    answers = [m for m in at.metric if m.label.endswith("answers")]
    name = cache.default_sample()  # served with "free" selection; it also answers under the paper's rule
    assert [m.label for m in answers] == [
        f"{name} (free selection) answers",
        f"{name} (paper selection) answers",
        "dense-tiny answers",
    ]
    assert _chart(at, "needle_hit")
    assert any("needle's block was chosen" in m.value and "under the paper rule" in m.value for m in at.markdown)
    at.checkbox(key="needle_other_rule").uncheck().run()
    assert not _errors(at)
    assert [m.label for m in at.metric if m.label.endswith("answers")] == [f"{name} answers", "dense-tiny answers"]


def test_the_needle_demo_answers_without_the_other_rule_when_the_checkpoint_is_gone(at, tmp_path):
    at.switch_page("views/model.py").run()
    at.file_uploader(key="upload_pick").set_value(
        ("tiny.safetensors", _tiny_checkpoint_bytes(tmp_path), "application/octet-stream")
    ).run()
    upload = cache.source_path(at.session_state["ckpt"])
    at.switch_page("views/needle.py")
    at.session_state["len"] = 256
    at.run()
    upload.unlink()  # the cached model still runs; its file can no longer be read for the other rule
    at.button(key="ask").click().run()
    assert not at.exception
    assert any("Cannot serve" in w.value and "free rule" in w.value for w in at.warning)  # it has the paper's
    answers = [m.label for m in at.metric if m.label.endswith("answers")]
    assert answers == [f"{cache.source_label(at.session_state['ckpt'])} answers"]


def test_a_needle_sweep_runs_with_progress_and_offers_its_results(at):
    at.switch_page("views/needle.py").run()
    at.multiselect(key="sweep_lengths").set_value([256])
    at.number_input(key="sweep_depths").set_value(2)
    at.number_input(key="sweep_trials").set_value(1)
    at.checkbox(key="sweep_twin").uncheck()
    at.button(key="run_sweep").click().run()
    assert not _errors(at)
    results = at.session_state["_sweep"]
    assert list(results) == [cache.default_sample()]
    assert results[cache.default_sample()]["lengths"] == [256] and len(results[cache.default_sample()]["depths"]) == 2
    assert _chart(at, f"sweep_grid_{cache.default_sample()}")
    # The NSA sample records which KV heads chose the needle's block, shown per outcome of its 2 trials.
    cell_choices = [c["needle_chosen"] for c in results[cache.default_sample()]["cells"]]
    assert [len(c) for c in cell_choices] == [1, 1]
    rates = niah.choice_rates(results[cache.default_sample()])
    assert rates["found"][1] + rates["missed"][1] == 2
    charted = {k.rsplit("_", 1)[1] for k in (c.key for c in at.get("plotly_chart")) if k.startswith("choice_")}
    empty = {c.value.split()[-1].rstrip(".") for c in at.caption if c.value.startswith("No trial was")}
    assert charted | empty == {"found", "missed"} and not charted & empty
    assert empty == {outcome for outcome, (_, n) in rates.items() if n == 0}


def test_the_gates_page_looks_near_a_phrase(at):
    at.switch_page("views/gates.py").run()
    at.text_input(key="gates_phrase").input("wrapping").run()
    assert not _errors(at)
    assert any(s.value.startswith("Near tokens") for s in at.subheader)
    at.text_input(key="gates_phrase").input("no such phrase here").run()
    assert not at.exception and at.warning


# Plain functions behind the pages ----------------------------------------------------------------


def test_device_choice_says_why():
    assert cache.choose_device("auto", cuda_available=False).device == "cpu"
    assert "no CUDA" in cache.choose_device("auto", cuda_available=False).reason
    assert cache.choose_device("auto", cuda_available=True) == cache.DeviceChoice(
        "cuda", "bfloat16", "a CUDA GPU is available (CUDA GPU)"
    )
    assert "requested" in cache.choose_device("cuda", cuda_available=False).reason
    with pytest.raises(ValueError):
        cache.choose_device("tpu")


def test_launcher_builds_the_streamlit_command_and_environment(tmp_path):
    args = launch.parse_args([str(tmp_path), "--port", "9000", "--headless", "--device", "cpu"])
    command = launch.streamlit_command(args)
    assert command[1:4] == ["-m", "streamlit", "run"] and command[4] == str(launch.APP_SCRIPT)
    assert "--server.port=9000" in command and "--server.headless=true" in command
    env = launch.app_environment(args)
    assert env[launch.ENV_CHECKPOINT] == str(tmp_path) and env[launch.ENV_DEVICE] == "cpu"
    assert str(tmp_path.resolve().parent) in env[launch.ENV_ROOTS].split(":")
    assert launch.ENV_ROOTS == safe_paths.ROOTS_ENV
    with pytest.raises(SystemExit):
        launch.streamlit_command(launch.parse_args(["--port", "0"]))


def test_live_benchmark_times_both_sides_on_the_cpu_reference():
    config = TINY_CONFIG
    calls = []
    rows = live_bench.run(
        reference,
        config,
        [32, 48],
        device="cpu",
        dtype=torch.float32,
        repeats=1,
        warmup=0,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert [r.length for r in rows] == [32, 48] and calls == [(1, 2), (2, 2)]
    assert all(r.nsa_ms > 0 and r.dense_ms > 0 and np.isfinite(r.speedup) for r in rows)


def test_uploads_are_kept_by_content_hash_in_the_private_folder():
    source = cache.store_upload(b"some bytes")
    path = cache.source_path(source)
    assert path.parent == cache.UPLOAD_DIR and path.read_bytes() == b"some bytes"
    with pytest.raises(cache.SourceError):
        cache.source_path("upload:../../etc/passwd")
    with pytest.raises(cache.SourceError):
        cache.source_path("file:///etc/passwd")


def test_the_trace_download_is_a_trace_file_of_the_input(tmp_path):
    from nsa_core.trace import ModelTrace

    source = cache.SAMPLE + "nsa-random"
    ids = tuple(range(40, 140))
    data = cache.trace_npz(source, "cpu", "float32", ids)
    (tmp_path / "t.npz").write_bytes(data)
    trace = ModelTrace.load(tmp_path / "t.npz")
    assert trace.token_ids.tolist() == list(ids)
    assert len(trace.layers) == 2 and trace.layers[0].gates.shape == (100, 4, 3)


def test_without_any_shipped_checkpoint_the_app_still_serves_and_takes_an_upload(monkeypatch, tmp_path):
    monkeypatch.setenv(launch.ENV_DEVICE, "cpu")
    monkeypatch.setenv("NSA_SAMPLE_MODELS", str(tmp_path / "none"))
    monkeypatch.delenv(launch.ENV_CHECKPOINT, raising=False)
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    assert not app.exception and app.warning
    app.switch_page("views/model.py").run()
    assert not app.exception
    app.file_uploader(key="upload_pick").set_value(
        ("tiny.safetensors", _tiny_checkpoint_bytes(tmp_path), "application/octet-stream")
    ).run()
    assert not _errors(app) and app.session_state["ckpt"].startswith(cache.UPLOAD)


def test_a_dense_model_opens_and_its_pages_say_what_it_lacks(monkeypatch):
    monkeypatch.setenv(launch.ENV_DEVICE, "cpu")
    app = AppTest.from_file(APP, default_timeout=120)
    app.query_params["ckpt"] = "sample:dense-tiny"
    app.run()
    assert not _errors(app)
    assert any("uses dense attention" in i.value for i in app.info)
    app.switch_page("views/gates.py").run()
    assert not _errors(app) and any("has no gates" in i.value for i in app.info)
