"""Performance page: a live benchmark on the user's GPU, and the recorded kernel benchmarks."""

from __future__ import annotations

import streamlit as st

from app import bench_results, figures, live_bench, session, widgets

st.title("Performance")
loaded = session.model()
config = loaded.model.config
choice = session.device_choice()

st.subheader("Live benchmark")
if choice.device != "cuda" or config.attention != "nsa":
    reason = choice.reason if choice.device != "cuda" else f"`{loaded.label}` is not an NSA model"
    st.info(
        f"The live benchmark needs an NSA model on a CUDA GPU ({reason}). The recorded results below "
        "were measured on the cards they name."
    )
else:
    st.caption(
        f"NSA attention of `{loaded.label}`'s shape ({config.n_head} query heads, {config.n_kv_head} KV heads, "
        f"head dim {config.head_dim}) on random inputs, against PyTorch's causal "
        f"`scaled_dot_product_attention`. NSA runs on: {loaded.backend_reason}."
    )
    lengths = st.multiselect(
        "Context lengths", [2048, 4096, 8192, 16384, 32768, 65536], default=[4096, 16384, 65536], key="bench_lengths"
    )
    if st.button("Run", key="run_bench", type="primary", disabled=not lengths, icon=":material/speed:"):
        bar = st.progress(0.0, text="Warming up…")
        ops, _ = loaded.model.ops()
        try:
            rows = live_bench.run(
                ops,
                config,
                sorted(lengths),
                device=loaded.model.device,
                dtype=loaded.model.dtype,
                progress=lambda done, total: bar.progress(done / total, text=f"{done}/{total} lengths"),
            )
        except RuntimeError as err:  # CUDA out of memory at the longest length, typically
            st.error(f"The benchmark stopped: {err}")
            rows = []
        bar.empty()
        st.session_state["_bench_rows"] = rows
    rows = st.session_state.get("_bench_rows")
    if rows:
        series = {
            "NSA": ([r.length for r in rows], [r.nsa_ms for r in rows]),
            "dense (SDPA)": ([r.length for r in rows], [r.dense_ms for r in rows]),
        }
        widgets.chart(
            figures.benchmark_lines(series, title="attention forward, median of 5"),
            key="bench_live",
            name="live-benchmark",
        )
        st.dataframe(
            [
                {
                    "tokens": r.length,
                    "NSA ms": round(r.nsa_ms, 3),
                    "dense ms": round(r.dense_ms, 3),
                    "speed-up": f"{r.speedup:.1f}x",
                }
                for r in rows
            ],
            hide_index=True,
        )

st.subheader("Recorded results")
files = bench_results.result_files()
if not files:
    st.info(f"No recorded benchmark in `{bench_results.RESULTS_DIR}` yet.")
    st.stop()
loaded_files = {}
for f in files:
    try:
        loaded_files[f.name] = bench_results.load(f)
    except bench_results.ResultsError as err:
        st.warning(f"Skipped {f.name}: {err}")
if not loaded_files:
    st.stop()
names = bench_results.newest_first(loaded_files)
name = st.selectbox("Result file", names, key="bench_file")
recorded = loaded_files[name]
st.caption(recorded.description)
for i, (title, series) in enumerate(recorded.charts.items()):
    widgets.chart(figures.benchmark_lines(series, title=title), key=f"bench_rec_{i}", name=f"benchmark-{i}")
with st.expander("All numbers"):
    st.dataframe(recorded.rows, hide_index=True)
