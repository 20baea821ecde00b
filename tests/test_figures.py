"""The app's pure pieces: figure builders, HTML snippets, URL view state, result parsing, the launcher.

Figures are checked as data (trace types, axis direction, NaN for cells nobody computed, click
overlays that really receive clicks, payload size), not as pictures; the browser tests look at them.
"""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import pytest

from app import bench_results, figures, snippets
from app.state import Zoom, encode_params, parse_params

TWO_MB = 2_000_000


def _block_edges(blocks: int, size: int) -> np.ndarray:
    return np.arange(blocks + 1) * size


def _overlays(fig: go.Figure) -> list:
    return [t for t in fig.data if t.type == "scatter" and t.marker.opacity == 0]


def _decoded(fig: go.Figure, index: int) -> np.ndarray:
    """z of trace `index` as Plotly serialises it (NaN survives as null in JSON)."""
    z = json.loads(fig.to_json())["data"][index]["z"]
    if isinstance(z, dict):  # typed-array encoding
        import base64

        shape = tuple(int(s) for s in str(z["shape"]).split(","))
        return np.frombuffer(base64.b64decode(z["bdata"]), dtype=np.dtype(z["dtype"])).reshape(shape)
    return np.array([[np.nan if v is None else v for v in row] for row in z], dtype=np.float64)


# Gate atlas -------------------------------------------------------------------------------------


def test_gate_atlas_has_three_panels_and_a_clickable_overlay_per_panel():
    gates = np.random.default_rng(0).random((4, 8, 3)).astype(np.float32)
    fig = figures.gate_atlas(gates, selected=(2, 5))
    assert [t.type for t in fig.data] == ["heatmap", "scatter"] * 3
    for heat, branch in zip(fig.data[0::2], range(3), strict=True):
        np.testing.assert_allclose(np.asarray(heat.z), gates[..., branch])
        assert (heat.zmin, heat.zmax) == (0, 1)
    for overlay in _overlays(fig):
        assert len(overlay.x) == 4 * 8
        # "skip" would drop clicks; the overlay must stay hoverable.
        assert overlay.hoverinfo != "skip"
    assert fig.layout.yaxis.range[0] > fig.layout.yaxis.range[1]  # layer 0 at the top
    assert len(fig.layout.shapes) == 3  # the picked (layer, head) outlined in each panel


def test_gate_atlas_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match="layers, heads, 3"):
        figures.gate_atlas(np.zeros((4, 8)))


# Selection map and NSA against dense ---------------------------------------------------------------


def test_selection_map_marks_the_causal_future_as_nan_and_reverses_the_query_axis():
    blocks, size = 6, 64
    edges = _block_edges(blocks, size)
    chosen = np.full((blocks, blocks), 0.5, np.float32)
    forced = np.zeros((blocks, blocks), np.float32)
    forced[:, 0] = 1.0
    fig = figures.selection_map(chosen, edges, edges, window=128, forced=forced, query=200)
    z = _decoded(fig, 0)
    future = np.triu(np.ones((blocks, blocks), bool), 1)
    assert np.isnan(z[future]).all() and not np.isnan(z[~future]).any()
    assert fig.layout.yaxis.range[0] > fig.layout.yaxis.range[1]
    # Axes are in tokens, so a click or a box comes back in token positions.
    assert fig.layout.xaxis.range == (-0.5, blocks * size - 0.5)
    forced_z = _decoded(fig, 1)
    assert np.isnan(forced_z[:, 1:]).all() and (forced_z[:, 0] == 1).all()
    overlay = _overlays(fig)[0]
    np.testing.assert_allclose(sorted(set(overlay.y)), (edges[:-1] + edges[1:] - 1) / 2)
    # Cells can be far wider on screen than a marker: the nearest marker must win, at any distance.
    assert fig.layout.hoverdistance == -1 and fig.layout.hovermode == "closest"


def test_selection_map_checks_edges_against_the_values():
    with pytest.raises(ValueError, match="edges"):
        figures.selection_map(np.zeros((3, 3)), np.arange(3), np.arange(4), window=8)


def test_nsa_vs_dense_normalises_rows_and_splits_covered_from_missed():
    rows, cols = 4, 4
    q_edges = k_edges = np.arange(rows + 1) * 16
    rng = np.random.default_rng(1)
    mass = np.tril(rng.random((rows, cols)))
    mass *= 16 / mass.sum(1, keepdims=True)  # each row of cells holds 16 queries with mass 1 each
    covered = mass * 0.75
    fig = figures.nsa_vs_dense(mass, covered, q_edges, k_edges, log_scale=False)
    dense, kept, missed = (_decoded(fig, i) for i in (0, 2, 4))
    np.testing.assert_allclose(np.nansum(dense, 1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(kept, dense * 0.75, rtol=1e-6)
    np.testing.assert_allclose(missed, dense * 0.25, rtol=1e-5)
    assert np.isnan(dense[np.triu_indices(rows, 1)]).all()


def test_head_recall_sorts_worst_first():
    fig = figures.head_recall(np.array([0.9, 0.2, 0.5]), oracle=np.array([1.0, 0.1, 0.4]), selected_head=1)
    assert list(fig.data[0].x) == ["head 1", "head 2", "head 0"]
    assert list(fig.data[0].customdata) == [1, 2, 0]


def test_block_importance_splits_forced_top_n_and_the_rest():
    scores = np.linspace(0, 1, 10)
    fig = figures.block_importance(scores, chosen=[0, 4, 8, 9], forced=[0, 8, 9], slc_block=64, query=620)
    by_name = {t.name: list(t.x) for t in fig.data}
    assert by_name == {"not chosen": [1, 2, 3, 5, 6, 7], "top-n": [4], "forced": [0, 8, 9]}


def test_dense_row_shades_the_chosen_blocks_and_the_window():
    row = np.full(300, 1 / 300)
    fig = figures.dense_row(row, query=299, chosen=[0, 4], slc_block=64, window=64)
    spans = sorted((s.x0, s.x1) for s in fig.layout.shapes)
    # Block 4 is cut at the query (keys after it are never read).
    assert spans == [(-0.5, 63.5), (235.5, 299.5), (255.5, 299.5)]


def test_gate_distribution_and_boxes_check_shapes():
    edges = np.linspace(0, 1, 11)
    fig = figures.gate_distributions(edges, np.ones((3, 10)), layer=0)
    assert [t.name for t in fig.data] == ["g_cmp", "g_slc", "g_win"]
    np.testing.assert_allclose(np.asarray(fig.data[0].y).sum(), 1.0)
    with pytest.raises(ValueError):
        figures.gate_distributions(edges, np.ones((3, 9)), layer=0)
    boxes = figures.gate_boxes(np.sort(np.random.default_rng(0).random((5, 4, 3)), 0), layer=1)
    assert len(boxes.data) == 3 and len(boxes.data[0].q1) == 4
    with pytest.raises(ValueError):
        figures.gate_boxes(np.zeros((4, 4, 3)), layer=1)


def test_niah_grid_keeps_unrun_cells_empty_and_is_clickable():
    score = np.array([[1.0, np.nan], [0.5, 0.0]])
    fig = figures.niah_grid([1024, 2048], [0.0, 1.0], score, title="t", trials=np.full((2, 2), 4))
    assert np.isnan(_decoded(fig, 0)[0, 1])
    assert len(_overlays(fig)[0].x) == 4
    assert list(fig.layout.xaxis.ticktext) == ["1k", "2k"]
    with pytest.raises(ValueError, match="depths"):
        figures.niah_grid([1024], [0.0, 1.0], np.zeros((1, 2)), title="t")
    # Fine depths keep distinct labels: 11.5% is not shown as a second 12%.
    fine = figures.niah_grid([16384], [0.11, 0.115, 0.12], np.ones((3, 1)), title="t")
    assert list(fine.layout.yaxis.ticktext) == ["11.0%", "11.5%", "12.0%"]


def test_needle_selection_shows_layers_top_down():
    fig = figures.needle_selection(np.array([[True, False], [False, True]]), rank=np.array([[0, 7], [-1, 1]]))
    assert fig.layout.yaxis.autorange == "reversed"
    assert list(np.asarray(fig.data[0].text).ravel()) == [
        "chosen<br>rank 0",
        "missed<br>rank 7",
        "missed<br>no vote",
        "chosen<br>rank 1",
    ]


def test_needle_choice_labels_each_cell_with_its_share_of_trials():
    fig = figures.needle_choice(np.array([[0.625, 0.0], [1.0, np.nan]]), trials=8, title="found")
    assert list(np.asarray(fig.data[0].text).ravel()) == ["62%<br>of 8", "0%<br>of 8", "100%<br>of 8", "no trials"]
    assert fig.layout.yaxis.autorange == "reversed" and fig.layout.title.text == "found"


# Payload budget ------------------------------------------------------------------------------------


def test_the_largest_clickable_maps_stay_under_two_megabytes():
    cells = 64  # what the Explorer asks the analyses for
    edges = np.arange(cells + 1) * 128
    rng = np.random.default_rng(0)
    values = np.tril(rng.random((cells, cells))).astype(np.float32)
    sel = figures.selection_map(values, edges, edges, window=512, forced=values / 2, query=100)
    dense = figures.nsa_vs_dense(values * 128, values * 64, edges, edges)
    assert figures.payload_bytes(sel) < TWO_MB
    assert figures.payload_bytes(dense) < TWO_MB


def test_a_512_cell_map_drops_the_overlay_and_stays_under_two_megabytes():
    edges = np.arange(513) * 128
    values = np.tril(np.random.default_rng(0).random((512, 512))).astype(np.float32)
    fig = figures.selection_map(values, edges, edges, window=512)
    assert not _overlays(fig)
    assert figures.payload_bytes(fig) < TWO_MB


def test_an_overlay_beyond_the_marker_cap_is_refused():
    with pytest.raises(ValueError, match="pool the map first"):
        figures.cell_overlay(np.arange(200), np.arange(200))


# Snippets --------------------------------------------------------------------------------------------


def test_snippets_escape_text_mark_the_query_and_cut_the_own_block_at_the_query():
    ids = list(b"<script>alert(1)</script>" + b"x" * 200)
    html = snippets.chosen_blocks_html(
        ids, chosen=[0, 2], forced=[0], slc_block=64, query=130, weights=np.full(131, 1 / 131)
    )
    assert "<script>" not in html and "&lt;" in html
    assert 'class="nsa-q"' in html and 'title="token 130"' in html
    assert 'title="token 131"' not in html  # block 2 is read only up to the query
    assert "block 0 · tokens 0–63 · forced" in html and "block 2 · tokens 128–130 · top-n" in html


def test_span_html_rejects_a_span_outside_the_tokens():
    with pytest.raises(ValueError):
        snippets.span_html([1, 2, 3], 2, 5)


# URL view state --------------------------------------------------------------------------------------


def test_parse_params_keeps_valid_values_and_explains_what_it_drops():
    values, notes = parse_params(
        {
            "ckpt": "sample:nsa-tiny",
            "layer": "2",
            "head": "-1",
            "query": "x",
            "zoom": "0,64,0,64",
            "depth": "1.5",
            "tokens": "512",
        }
    )
    assert values == {"ckpt": "sample:nsa-tiny", "layer": 2, "zoom": Zoom(0, 64, 0, 64), "tokens": 512}
    assert len(notes) == 3 and any("head" in n for n in notes) and any("depth" in n for n in notes)


def test_view_state_round_trips_through_the_url():
    values = {
        "ckpt": "sample:nsa-tiny",
        "layer": 1,
        "head": 3,
        "query": 700,
        "zoom": Zoom(512, 1024, 0, 1024),
        "len": 2048,
        "depth": 0.25,
    }
    assert parse_params(encode_params(values)) == (values, [])


def test_zoom_from_a_box_is_clipped_to_the_sequence():
    zoom = Zoom.from_box([-30.2, 100.4], [900.0, 50.0], length=512)
    assert zoom == Zoom(q_lo=50, q_hi=512, k_lo=0, k_hi=101)
    with pytest.raises(ValueError):
        Zoom(10, 10, 0, 5)


# Recorded benchmarks ---------------------------------------------------------------------------------


def test_bench_results_group_records_into_charts():
    doc = {
        "card": "H100",
        "date": "2026-11-28",
        "errors": ["x"],
        "results": [
            {"shape": "paper128", "stage": "nsa", "impl": "triton", "T": 16384, "ms": 2.0},
            {"shape": "paper128", "stage": "nsa", "impl": "triton", "T": 8192, "ms": 1.0},
            {"shape": "paper128", "stage": "dense", "impl": "sdpa-flash", "T": 8192, "ms": 3.0},
            {"shape": "small", "stage": "select", "impl": "triton", "T": 8192, "ms": 0.5},
            {"shape": "small", "stage": "tune:select-merge", "impl": "4", "T": 8192, "ms": 0.4},
            {"shape": "small", "stage": "probe:select", "impl": "- merge", "T": 8192, "ms": 0.2},
            {"note": "no numbers here"},
        ],
    }
    rec = bench_results.parse(doc)
    assert rec.charts["shape paper128"]["nsa · triton"] == ([8192, 16384], [1.0, 2.0])
    assert set(rec.charts["shape paper128"]) == {"nsa · triton", "dense · sdpa-flash"}
    assert set(rec.charts) == {"shape paper128", "shape small"}
    assert set(rec.charts["shape small"]) == {"select · triton"}  # sweeps and probes stay in the table only
    assert len(rec.rows) == 7
    assert "card: H100" in rec.description and "errors" not in rec.description


def test_bench_results_read_wide_records_as_one_line_per_timing_field():
    doc = {
        "benchmark": "trace",
        "rows": [
            {"T": 2048, "trace_s": 0.5, "maps_ms": 3.0, "mean_recall": 0.2},
            {"T": 1024, "trace_s": 0.25, "maps_ms": 2.0, "mean_recall": 0.3},
        ],
    }
    rec = bench_results.parse(doc)
    assert rec.charts == {"trace": {"trace": ([1024, 2048], [250.0, 500.0]), "maps": ([1024, 2048], [2.0, 3.0])}}


def test_bench_results_list_the_latest_full_run_first():
    def doc(date, shapes, lengths, stage="nsa"):
        rows = [{"shape": s, "stage": stage, "impl": "triton", "T": t, "ms": 1.0} for s in shapes for t in lengths]
        return bench_results.parse({"date": date, "results": rows})

    recorded = {
        "h100-old.json": doc("2026-11-28", ["a", "b", "c"], [1, 2, 3, 4]),  # richer, but older
        "h200-sweep.json": doc("2026-11-29", ["a"], [4]),
        "h200-full.json": doc("2026-11-29", ["a", "b"], [1, 2, 3, 4]),
        "h200-64k.json": doc("2026-11-29", ["a", "b"], [4]),
        "h200-probe.json": doc("2026-11-30", ["a", "b"], [1, 2, 3, 4], stage="probe:x"),  # newest, but no chart
        "undated.json": bench_results.parse([{"T": 1, "x_ms": 1.0}]),
    }
    assert bench_results.newest_first(recorded) == [
        "h200-full.json", "h200-64k.json", "h200-sweep.json", "h100-old.json", "undated.json", "h200-probe.json"]
    # the shipped results open on a dated run with charts
    shipped = {f.name: bench_results.load(f) for f in bench_results.result_files()}
    first = shipped[bench_results.newest_first(shipped)[0]]
    assert first.date and first.charts


def test_bench_results_refuse_a_file_without_records(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"card": 1}')
    with pytest.raises(bench_results.ResultsError, match="no list of records"):
        bench_results.load(bad)
    bad.write_text("not json")
    with pytest.raises(bench_results.ResultsError, match="not JSON"):
        bench_results.load(bad)


# Exports ---------------------------------------------------------------------------------------------


def test_figures_export_as_png_svg_and_offline_html():
    from app import export

    fig = figures.gate_atlas(np.random.default_rng(0).random((2, 4, 3)))
    assert export.figure_image(fig, "png").startswith(b"\x89PNG\r\n\x1a\n")
    assert b"<svg" in export.figure_image(fig, "svg")[:400]
    html = export.figure_html(fig)
    # plotly.js is inlined (several MB) and no script is fetched from elsewhere: it opens offline.
    assert b"<html" in html[:200] and len(html) > 1_000_000 and b"<script src=" not in html
    with pytest.raises(ValueError, match="format"):
        export.figure_image(fig, "gif")
