"""The needle-in-a-haystack harness: prompt construction, exact-match scoring, sweeps, the CLI."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nsa_core import data, niah, tokenizer
from nsa_core.checkpoint import save_pretrained
from nsa_core.config import NSAConfig
from nsa_core.model import NSALM

HAYSTACK = "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.\n" * 20


class ScriptedModel:
    """Stands in for NSALM.generate: answers each prompt by a rule, so scoring is checked on known answers."""

    def __init__(self, answer):
        self.answer = answer  # prompt ids -> answer tokens
        self.device = torch.device("cpu")
        self.config = SimpleNamespace(attention="scripted")
        self.calls = []

    def generate(self, ids, *, max_new_tokens, stop_token):
        self.calls.append((tuple(ids.shape), max_new_tokens, stop_token))
        rows = [self.answer(row)[:max_new_tokens] for row in ids.tolist()]
        width = max(map(len, rows))
        return torch.tensor([r + [tokenizer.PAD] * (width - len(r)) for r in rows])


def needle_key(prompt_ids):
    """The key a perfect reader finds in the prompt."""
    text = tokenizer.decode(prompt_ids)
    start = text.index("The pass key is ") + len("The pass key is ")
    return text[start:start + 5]


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_prompt_has_exact_length_and_the_needle_at_its_depth(depth):
    prompt = niah.build_prompt(HAYSTACK, length=700, depth=depth, key="27182", offset=11)
    assert len(prompt.ids) == 700
    assert prompt.ids[0] == tokenizer.BOS and prompt.ids[-1] == tokenizer.SEP
    needle = tokenizer.encode(data.NEEDLE.format(key="27182"))
    assert prompt.ids[prompt.needle_at:prompt.needle_at + len(needle)] == needle
    hay_len = 700 - niah.prompt_overhead()
    assert abs((prompt.needle_at - 2) / hay_len - depth) < 1e-2
    assert tokenizer.decode(prompt.ids).endswith(data.QUESTION)
    # The haystack is read from the offset, wrapping around the text.
    assert prompt.ids[1:6] == tokenizer.encode(HAYSTACK[11:16]) or depth == 0.0


def test_prompt_rejects_bad_input():
    with pytest.raises(ValueError, match="5 ASCII digits"):
        niah.build_prompt(HAYSTACK, length=500, depth=0.5, key="1234")
    with pytest.raises(ValueError, match="shorter than the needle"):
        niah.build_prompt(HAYSTACK, length=50, depth=0.5, key="12345")
    with pytest.raises(ValueError, match="depth"):
        niah.build_prompt(HAYSTACK, length=500, depth=1.5, key="12345")
    with pytest.raises(ValueError, match="non-empty"):
        niah.haystack_tokens("")


@pytest.mark.parametrize(("tokens", "expected"), [
    (tokenizer.encode("12345") + [tokenizer.EOS], True),
    (tokenizer.encode("12345") + [tokenizer.EOS, 7, 7], True),  # what follows <eos> is not the answer
    (tokenizer.encode("12345"), False),  # no <eos>: the answer never ended
    (tokenizer.encode("123456") + [tokenizer.EOS], False),
    (tokenizer.encode("12346") + [tokenizer.EOS], False),
    (tokenizer.encode(" 12345") + [tokenizer.EOS], False),
    ([tokenizer.EOS], False),
])
def test_exact_match_scoring(tokens, expected):
    assert niah.is_correct(tokens, "12345") is expected


def test_run_cell_scores_known_answers():
    oracle = ScriptedModel(lambda ids: tokenizer.encode(needle_key(ids)) + [tokenizer.EOS])
    cell = niah.run_cell(oracle, HAYSTACK, length=400, depth=0.5, trials=6, seed=1, batch_size=4)
    assert cell.correct == 6 and cell.accuracy == 1.0 and cell.answers == cell.keys
    assert [c[0] for c in oracle.calls] == [(4, 400), (2, 400)] and oracle.calls[0][1:] == (6, tokenizer.EOS)
    # Right digits for every other trial only.
    flaky = ScriptedModel(lambda ids: tokenizer.encode(needle_key(ids) if int(needle_key(ids)) % 2 else "00000")
                          + [tokenizer.EOS])
    cell = niah.run_cell(flaky, HAYSTACK, length=400, depth=0.5, trials=6, seed=1)
    assert cell.correct == sum(int(k) % 2 for k in cell.keys)
    # Same seed, same keys and prompts.
    assert niah.run_cell(oracle, HAYSTACK, length=400, depth=0.5, trials=6, seed=1).keys == cell.keys


def test_sweep_of_a_real_model_writes_json_and_reports_progress(tmp_path):
    config = NSAConfig(d_model=32, n_layer=1, n_head=2, n_kv_head=1, head_dim=16, v_head_dim=16, mlp_hidden=64,
                       cmp_block=16, cmp_stride=8, slc_block=16, top_n=3, window=32, cmp_mlp_hidden=8)
    model = NSALM(config).eval()
    seen = []
    results = niah.sweep(model, HAYSTACK, lengths=[150, 200], depths=niah.even_depths(2), trials=2, progress=False,
                         callback=lambda done, total, cell: seen.append((done, total, cell.length)))
    assert seen == [(1, 4, 150), (2, 4, 150), (3, 4, 200), (4, 4, 200)]
    assert np.array(results["accuracy"]).shape == (2, 2)
    assert all(len(c["answers"]) == 2 for c in results["cells"])
    path = niah.write_results(results, tmp_path / "r.json")
    assert json.loads(path.read_text())["lengths"] == [150, 200]
    assert "| 150 |" in niah.format_grid(results)


def test_needle_chosen_is_the_reference_selection_at_the_answer_token():
    """Per layer and KV group, needle_chosen (from the trace) agrees with the reference top-n recomputed for the
    prompt's last query, over the blocks that hold any of the needle sentence."""
    from nsa_core import analysis

    config = NSAConfig(d_model=32, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, v_head_dim=16, mlp_hidden=64,
                       cmp_block=16, cmp_stride=8, slc_block=16, top_n=8, window=32, cmp_mlp_hidden=8)
    model = NSALM(config).eval()
    model.reset_parameters(seed=2)
    seen = set()
    for depth, key in ((0.2, "11111"), (0.5, "27182"), (0.8, "31415")):
        prompt = niah.build_prompt(HAYSTACK, length=400, depth=depth, key=key)
        needle = tokenizer.encode(data.NEEDLE.format(key=key))
        first, last = prompt.needle_span
        assert prompt.ids[first:last + 1] == needle
        blocks = np.arange(first // 16, last // 16 + 1)
        chosen = niah.needle_chosen(model, prompt)
        assert chosen.shape == (2, 2) and chosen.dtype == bool
        ids = torch.tensor([prompt.ids])
        for layer in range(2):
            selected = analysis.query_detail(model, ids, layer=layer, query=len(prompt.ids) - 1).selected
            np.testing.assert_array_equal(chosen[layer], np.isin(selected, blocks).any(-1))
        seen |= set(chosen.ravel().tolist())
    assert seen == {True, False}  # the prompts above exercise both outcomes


def test_a_sweep_records_which_groups_chose_the_needle_when_asked():
    config = NSAConfig(d_model=32, n_layer=2, n_head=2, n_kv_head=1, head_dim=16, v_head_dim=16, mlp_hidden=64,
                       cmp_block=16, cmp_stride=8, slc_block=16, top_n=3, window=32, cmp_mlp_hidden=8)
    model = NSALM(config).eval()
    plain = niah.sweep(model, HAYSTACK, lengths=[150], depths=[0.5], trials=3, progress=False)
    assert "needle_chosen" not in plain["cells"][0]
    recorded = niah.sweep(model, HAYSTACK, lengths=[150], depths=[0.5], trials=3, progress=False, record_choice=True)
    cell = recorded["cells"][0]
    assert cell["answers"] == plain["cells"][0]["answers"]
    assert len(cell["needle_chosen"]) == 3 and all(np.array(c).shape == (2, 1) for c in cell["needle_chosen"])
    assert json.loads(json.dumps(recorded))["cells"][0]["needle_chosen"] == cell["needle_chosen"]
    assert niah.choice_rates(plain) is None
    with pytest.raises(ValueError, match="NSA"):
        niah.sweep(NSALM(config.replace(attention="dense")), HAYSTACK, lengths=[150], depths=[0.5], trials=1,
                   progress=False, record_choice=True)


def test_choice_rates_split_the_trials_by_outcome():
    cells = [{"answers": ["12345", "9", "55555"], "keys": ["12345", "11111", "55555"],
              "needle_chosen": [[[True, False]], [[True, True]], [[False, False]]]},
             {"answers": ["2222"], "keys": ["22222"], "needle_chosen": [[[False, True]]]}]
    rates = niah.choice_rates({"cells": cells})
    found, n_found = rates["found"]
    missed, n_missed = rates["missed"]
    assert (n_found, n_missed) == (2, 2)
    np.testing.assert_array_equal(found, [[0.5, 0.0]])
    np.testing.assert_array_equal(missed, [[0.5, 1.0]])
    table = niah.format_choice(rates).splitlines()
    assert table[0] == "| layer | group 0: found (2) / missed (2) | group 1: found (2) / missed (2) |"
    assert table[2] == "| 0 | 50% / 50% | 0% / 100% |"
    all_found = niah.choice_rates({"cells": [dict(cells[0], answers=cells[0]["keys"])]})
    assert all_found["missed"][1] == 0 and np.isnan(all_found["missed"][0]).all()
    assert niah.format_choice(all_found).splitlines()[2] == "| 0 | 67% / - | 33% / - |"


def test_cli_runs_a_checkpoint_on_a_users_text(tmp_path, capsys):
    config = NSAConfig(d_model=32, n_layer=1, n_head=2, n_kv_head=1, head_dim=16, v_head_dim=16, mlp_hidden=64,
                       cmp_block=16, cmp_stride=8, slc_block=16, top_n=3, window=32, cmp_mlp_hidden=8,
                       attention="dense")
    save_pretrained(NSALM(config), tmp_path / "ckpt")
    (tmp_path / "hay.txt").write_text(HAYSTACK)
    out = tmp_path / "res.json"
    code = niah.cli([str(tmp_path / "ckpt"), "--haystack", str(tmp_path / "hay.txt"), "--lengths", "160",
                     "--depths", "2", "--trials", "2", "--device", "cpu", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["attention"] == "dense" and results["trials"] == 2 and len(results["cells"]) == 2
    assert results["attention_backend"].startswith("reference")
    assert results["haystack"] == {"file": str((tmp_path / "hay.txt").resolve())}
    assert niah.cli([str(tmp_path / "ckpt"), "--haystack", str(tmp_path / "hay.txt"), "--lengths", "160",
                     "--depths", "0.25,0.75", "--trials", "1", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["depths"] == [0.25, 0.75]
    # The held-out haystack of another standard-library folder.
    stdlib = tmp_path / "stdlib"
    stdlib.mkdir()
    for i in range(40):
        (stdlib / f"mod_{i:02d}.py").write_text(HAYSTACK)
    assert niah.cli([str(tmp_path / "ckpt"), "--corpus-root", str(stdlib), "--lengths", "160", "--depths", "1",
                     "--trials", "1", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["haystack"] == data.corpus_summary(stdlib)  # the results say which text
    assert len(niah.load_haystack(niah.HELDOUT, corpus_root=stdlib)) == len(
        data.stdlib_corpus("heldout", root=stdlib))
    assert niah.cli([str(tmp_path / "ckpt"), "--depths", "0.5,2", "--device", "cpu"]) == 2
    assert "every depth must be in [0, 1]" in capsys.readouterr().err
    assert niah.cli([str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "nsa-explorer niah" in capsys.readouterr().err
    assert niah.cli([str(tmp_path / "ckpt"), "--device", "cpu", "--record-choice"]) == 2
    assert "--record-choice needs an NSA checkpoint" in capsys.readouterr().err
    # The kernels need CUDA: asking for them on a CPU is a clear refusal, not a traceback.
    assert niah.cli([str(tmp_path / "ckpt"), "--device", "cpu", "--backend", "triton"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_cli_records_and_prints_which_groups_chose_the_needle(tmp_path, capsys):
    config = NSAConfig(d_model=32, n_layer=2, n_head=2, n_kv_head=1, head_dim=16, v_head_dim=16, mlp_hidden=64,
                       cmp_block=16, cmp_stride=8, slc_block=16, top_n=3, window=32, cmp_mlp_hidden=8)
    save_pretrained(NSALM(config), tmp_path / "ckpt")
    (tmp_path / "hay.txt").write_text(HAYSTACK)
    out = tmp_path / "res.json"
    assert niah.cli([str(tmp_path / "ckpt"), "--haystack", str(tmp_path / "hay.txt"), "--lengths", "160",
                     "--depths", "0.5", "--trials", "2", "--device", "cpu", "--record-choice", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "The needle's block chosen at the answer token" in printed and "| 1 |" in printed
    assert np.array(json.loads(out.read_text())["cells"][0]["needle_chosen"]).shape == (2, 2, 1)


def test_depth_labels_keep_fine_depths_apart():
    assert niah.depth_labels(niah.even_depths(10))[:3] == ["0.00", "0.11", "0.22"]
    assert niah.depth_labels([0.11, 0.115, 0.12]) == ["0.110", "0.115", "0.120"]
    assert niah.depth_labels([0.0, 0.5, 1.0], percent=True) == ["0%", "50%", "100%"]
    grid = niah.format_grid({"depths": [0.11, 0.115], "lengths": [16384], "accuracy": [[1.0, 0.5]]})
    assert grid.splitlines()[0] == "| length \\ depth | 0.110 | 0.115 | min |"


def test_depths_from_a_count_or_a_list():
    assert niah.parse_depths("3") == [0.0, 0.5, 1.0]
    assert niah.parse_depths("0.05, 0.1,0.115") == [0.05, 0.1, 0.115]
    for bad in ("0.5,1.5", "", "a,b", "-0.1"):
        with pytest.raises(ValueError):
            niah.parse_depths(bad)


def test_even_depths():
    assert niah.even_depths(10)[0] == 0.0 and niah.even_depths(10)[-1] == 1.0 and len(niah.even_depths(10)) == 10
    with pytest.raises(ValueError):
        niah.even_depths(0)
