"""Needle page: hide a pass key in real text, ask the model for it, and see whether NSA selected the
needle's block when it answered; then sweep context length x depth, NSA beside its dense twin."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import cache, figures, session, snippets, state, widgets
from nsa_core import data, niah
from nsa_core.config import SLC_SCORES

LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
ANSWER_TOKENS = 6  # five digits and <eos>

st.title("Needle in a haystack")
st.caption(
    "A five-digit pass key is hidden at a chosen depth of real text (held-out Python standard-library "
    "files the models never trained on); the prompt ends by asking for it. The answer is greedy and "
    "scored by exact match."
)
loaded = session.model()
config = loaded.model.config
choice = session.device_choice()
limit = session.token_limit()
lengths = [n for n in LENGTHS if n <= limit]
twin_name = cache.dense_twin(config) if config.attention == "nsa" else None
twin_source = cache.SAMPLE + twin_name if twin_name else None
# An NSA checkpoint also answers under the other block-selection rule, to show what the rule changes.
other_rule = next((r for r in SLC_SCORES if r != config.slc_scores), None) if config.attention == "nsa" else None
checkpoint_label = cache.source_label(cache.split_scores(loaded.source)[0])


def other_rule_source() -> str | None:
    """The open checkpoint under the other selection rule; None, with a warning, if it cannot be read now."""
    try:
        return cache.with_scores(loaded.source, other_rule)
    except Exception as err:  # its files changed or went away since it was opened: answer without it
        st.warning(f"Cannot serve **{loaded.label}** under the {other_rule} rule: {err}")
        return None


def haystack_widget(key: str) -> np.ndarray:
    """The haystack: the held-out files, or an uploaded text file."""
    own = st.file_uploader("Your own haystack text (optional)", type=["txt", "md", "py"], key=key, max_upload_size=16)
    if own is None:
        return cache.heldout_haystack()
    try:
        return niah.haystack_tokens(own.getvalue())
    except ValueError as err:
        st.error(f"That file cannot be a haystack: {err}")
        st.stop()


def show_answer(ids: tuple[int, ...], key: str, span: tuple[int, int], other_source: str | None) -> None:
    """Each model's answer, then (NSA) whether the needle's block was chosen at the answer token.

    other_source: the same checkpoint under the other selection rule, answering beside it, or None."""
    models = [(loaded.label, loaded.source)]
    if other_source is not None:
        models = [(f"{checkpoint_label} ({config.slc_scores} selection)", loaded.source),
                  (f"{checkpoint_label} ({other_rule} selection)", other_source)]
    models += [(twin_name, twin_source)] if twin_source else []
    cols = st.columns(len(models))
    for col, (label, source) in zip(cols, models, strict=True):
        with col, st.spinner(f"{label} is reading {len(ids)} tokens…"):
            tokens = cache.generate_answer(source, choice.device, choice.dtype, ids, ANSWER_TOKENS)
        right = niah.is_correct(tokens, key)
        col.metric(
            f"{label} answers",
            niah.answer_text(tokens) or "(nothing)",
            delta="correct" if right else f"wrong: the key is {key}",
            delta_color="normal" if right else "inverse",
        )
    if config.attention == "nsa":
        with st.spinner("Tracing the prompt…"):
            trace = cache.trace_ids(loaded.source, choice.device, choice.dtype, ids).trace
            hit, rank = cache.needle_selection(loaded.source, choice.device, choice.dtype, ids, span)
        in_window = span[1] >= len(ids) - config.window
        other = ""
        if other_source is not None:
            with st.spinner(f"Tracing the prompt under the {other_rule} rule…"):
                other_hit, _ = cache.needle_selection(other_source, choice.device, choice.dtype, ids, span)
            other = f" ({int(other_hit.sum())} of {other_hit.size} under the {other_rule} rule)"
        st.markdown(
            f"At the answer token (position {len(ids) - 1}): the needle's block was chosen in "
            f"**{int(hit.sum())} of {hit.size}** (layer, KV head) pairs{other}"
            + (
                " — it also lies inside the sliding window."
                if in_window
                else f"; it lies {len(ids) - 1 - span[1]} tokens back, outside the {config.window}-token window."
            )
        )
        left, right_col = st.columns(2)
        with left:
            widgets.chart(figures.needle_selection(hit, rank=rank), key="needle_hit", name="needle-selected")
        with right_col:
            layer = state.clamp("layer", config.n_layer)
            gates = trace.layers[layer].gates[len(ids) - 1]
            widgets.chart(
                figures.gate_bars(gates, query=len(ids) - 1), key="needle_gates", name=f"needle-gates-L{layer}"
            )
            st.caption(f"Gates of layer {layer} at the answer token (pick the layer on the Explorer page).")


def show_grids(results: dict[str, dict], key: str) -> None:
    """One length x depth grid per model, side by side; results[label] as nsa_core.niah.sweep returns it."""
    cols = st.columns(len(results))
    for col, (label, res) in zip(cols, results.items(), strict=True):
        score = np.array(res["accuracy"], dtype=np.float32).T  # [depths, lengths]
        with col:
            widgets.chart(
                figures.niah_grid(
                    res["lengths"],
                    res["depths"],
                    score,
                    title=f"{label}: exact match",
                    trials=np.full(score.shape, res["trials"]),
                ),
                key=f"{key}_{label}",
                name=f"niah-{label}",
            )


def show_choice(results: dict[str, dict]) -> None:
    """For each sweep recorded with the choice (NSA): per layer and KV head, how often the needle's block was
    chosen at the answer token, in the trials it found and in those it missed."""
    for label, res in results.items():
        rates = niah.choice_rates(res)
        if rates is None:
            continue
        covered = config.top_n * config.slc_block
        st.markdown(
            f"**{label}: was the needle's block chosen at the answer token?** Layers and KV heads that choose it "
            "more often when the key is found than when it is missed are the ones that retrieve it. Up to "
            f"{covered:,} tokens (n = {config.top_n} blocks of {config.slc_block}) every block is chosen."
        )
        cols = st.columns(2)
        for col, (outcome, (rate, n)) in zip(cols, rates.items(), strict=True):
            with col:
                if n == 0:
                    st.caption(f"No trial was {outcome}.")
                    continue
                widgets.chart(
                    figures.needle_choice(rate, trials=n, title=f"trials {outcome} ({n})"),
                    key=f"choice_{label}_{outcome}",
                    name=f"needle-choice-{label}-{outcome}",
                )


one, sweep_tab = st.tabs(["One prompt", "Length × depth sweep"])
with one:
    c1, c2, c3 = st.columns([2, 2, 1])
    if st.session_state.get("len") not in lengths:
        st.session_state["len"] = lengths[min(2, len(lengths) - 1)]
    st.session_state.setdefault("depth", 0.5)
    length = c1.select_slider("Context length (tokens)", lengths, key="len")
    depth = c2.slider("Needle depth", 0.0, 1.0, step=0.05, key="depth")
    seed = int(c3.number_input("Seed", 0, 10_000, 0, key="needle_seed"))
    haystack = haystack_widget("needle_haystack")
    state.publish(("ckpt", "len", "depth"))
    key = data.random_key(np.random.default_rng([seed, length]))
    prompt = niah.build_prompt(haystack, length=length, depth=depth, key=key, offset=seed * 7919)
    ids = tuple(prompt.ids)
    span = prompt.needle_span
    compare = other_rule is not None and st.checkbox(
        f"Also answer under the {other_rule} selection rule",
        value=True,
        key="needle_other_rule",
        help="The same weights, ranking blocks the other way (the sidebar's *Block selection* explains both).",
    )
    if st.button("Ask the model", key="ask", type="primary", icon=":material/play_arrow:"):
        st.session_state["_asked"] = (loaded.source, ids)
    with st.expander(f"The prompt around the needle (tokens {span[0]}–{span[1]} of {len(ids)})"):
        st.html(snippets.span_html(ids, max(0, span[0] - 200), min(len(ids), span[1] + 200), highlight=span))
        st.html(
            snippets.span_html(
                ids,
                max(0, len(ids) - 120),
                len(ids),
                query=len(ids) - 1,
                title="…the end of the prompt: the question, then <sep>",
            )
        )

    if st.session_state.get("_asked") == (loaded.source, ids):
        with st.container(key="needle_result"):
            show_answer(ids, key, span, other_rule_source() if compare else None)

with sweep_tab:
    shipped = {
        label: rec
        for label, source in [(loaded.label, loaded.source), (twin_name, twin_source)]
        if source and (rec := cache.recorded_niah(source))
    }
    if shipped:
        st.markdown("**Recorded with the checkpoints** (the sweep in each model's `niah.json`)")
        show_grids(shipped, "recorded")
        st.markdown("**Run your own**")
    st.caption(
        "Every (length, depth) cell runs `trials` prompts with their own keys and haystack offsets. "
        "On a CPU keep it small: each prompt is a full forward pass."
    )
    c1, c2, c3 = st.columns([3, 1, 1])
    picked = c1.multiselect("Context lengths", lengths, default=lengths[:2], key="sweep_lengths")
    n_depths = int(c2.number_input("Depths", 1, 11, 3, key="sweep_depths"))
    trials = int(c3.number_input("Trials per cell", 1, 50, 2, key="sweep_trials"))
    with_twin = st.checkbox(
        f"Also run the dense twin ({twin_name})",
        value=twin_source is not None,
        disabled=twin_source is None,
        key="sweep_twin",
    )
    record = st.checkbox(
        "Record which layers and KV heads chose the needle's block at the answer token",
        value=config.attention == "nsa",
        disabled=config.attention != "nsa",
        key="sweep_choice",
        help="One more forward pass per prompt of the NSA model, traced.",
    )
    haystack = haystack_widget("sweep_haystack")
    depths = niah.even_depths(n_depths)
    if st.button("Run sweep", key="run_sweep", type="primary", disabled=not picked, icon=":material/grid_view:"):
        runs = [(loaded.label, loaded.source)] + ([(twin_name, twin_source)] if with_twin and twin_source else [])
        results = {}
        bar = st.progress(0.0, text="Starting…")
        total = len(picked) * len(depths) * len(runs)
        done_before = 0
        for label, source in runs:
            model = cache.load_model(source, choice.device, choice.dtype).model

            def report(done, _total, cell, label=label, offset=done_before):
                bar.progress(
                    (offset + done) / total,
                    text=f"{label}: {cell.length} tokens, depth {cell.depth:.0%} "
                    f"→ {cell.correct}/{cell.trials} correct",
                )

            results[label] = niah.sweep(
                model,
                haystack,
                lengths=sorted(picked),
                depths=depths,
                trials=trials,
                seed=0,
                progress=False,
                record_choice=record and model.config.attention == "nsa",
                callback=report,
            )
            done_before += len(picked) * len(depths)
        bar.empty()
        st.session_state["_sweep"] = results
    results = st.session_state.get("_sweep")
    if results:
        show_grids(results, "sweep_grid")
        show_choice(results)
        widgets.download_json("Download sweep results (JSON)", results, file_name="niah-sweep.json", key="dl_sweep")
