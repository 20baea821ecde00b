"""NSAConfig: JSON round trip, and every invalid combination refused with the rule and the values named."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from nsa_core.config import FORMAT_VERSION, MODEL_TYPE, ConfigError, NSAConfig

NON_DEFAULT = {
    "vocab_size": 300, "d_model": 96, "n_layer": 3, "n_head": 12, "n_kv_head": 3, "head_dim": 24, "v_head_dim": 20,
    "mlp_hidden": 200, "rope_theta": 500000.0, "norm_eps": 1e-6, "cmp_block": 48, "cmp_stride": 8, "slc_block": 32,
    "top_n": 7, "init_blocks": 2, "local_blocks": 3, "window": 100, "cmp_fn": "mean", "cmp_mlp_hidden": 16,
    "kv_mode": "independent", "slc_scores": "free",
}


def test_defaults_are_the_paper_configuration():
    c = NSAConfig()
    assert (c.cmp_block, c.cmp_stride, c.slc_block, c.top_n, c.window) == (32, 16, 64, 16, 512)
    assert (c.init_blocks, c.local_blocks, c.attention, c.cmp_fn, c.kv_mode) == (1, 2, "nsa", "mlp", "shared")
    assert c.slc_scores == "paper"
    assert c.group_size == c.n_head // c.n_kv_head


@pytest.mark.parametrize("fields", [{}, NON_DEFAULT, {"attention": "dense"}], ids=["default", "custom", "dense"])
def test_json_round_trip(fields, tmp_path):
    config = NSAConfig(**fields)
    text = config.to_json()
    data = json.loads(text)
    assert data["model_type"] == MODEL_TYPE and data["format_version"] == FORMAT_VERSION
    assert {k: data[k] for k in fields} == fields
    assert NSAConfig.from_json(text) == config
    assert NSAConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "config.json"
    path.write_text(text, encoding="utf-8")
    assert NSAConfig.load(path) == config


def test_config_is_frozen_and_replace_validates():
    config = NSAConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.top_n = 3
    assert config.replace(top_n=3).top_n == 3 and config.top_n == 16
    with pytest.raises(ConfigError, match=r"top_n \(2\)"):
        config.replace(top_n=2)


def test_integral_floats_are_accepted_as_floats():
    config = NSAConfig(rope_theta=10000, norm_eps=1)
    assert isinstance(config.rope_theta, float) and isinstance(config.norm_eps, float)
    assert NSAConfig.from_json(config.to_json()) == config


# Each case: the fields that break a rule, then strings the message must contain (rule and values).
INVALID = {
    "int as str": ({"n_layer": "4"}, ["n_layer", "int", "'4'"]),
    "bool as int": ({"top_n": True}, ["top_n", "True"]),
    "float as int": ({"window": 512.0}, ["window", "512.0"]),
    "str as number": ({"cmp_fn": 1}, ["cmp_fn", "str", "1"]),
    "zero layers": ({"n_layer": 0}, ["n_layer", ">= 1", "0"]),
    "negative window": ({"window": -5}, ["window", ">= 1", "-5"]),
    "zero stride": ({"cmp_stride": 0}, ["cmp_stride", ">= 1", "0"]),
    "zero top_n": ({"top_n": 0, "init_blocks": 0, "local_blocks": 0}, ["top_n", ">= 1", "0"]),
    "negative init": ({"init_blocks": -1}, ["init_blocks", ">= 0", "-1"]),
    "negative local": ({"local_blocks": -2}, ["local_blocks", ">= 0", "-2"]),
    "zero theta": ({"rope_theta": 0.0}, ["rope_theta", "0.0", "> 0"]),
    "nan theta": ({"rope_theta": math.nan}, ["rope_theta", "nan"]),
    "infinite eps": ({"norm_eps": math.inf}, ["norm_eps", "inf"]),
    "attention kind": ({"attention": "sparse"}, ["attention", "'sparse'", "nsa", "dense"]),
    "cmp_fn": ({"cmp_fn": "max"}, ["cmp_fn", "'max'", "mlp", "mean"]),
    "kv_mode": ({"kv_mode": "split"}, ["kv_mode", "'split'", "shared", "independent"]),
    "slc_scores": ({"slc_scores": "renorm"}, ["slc_scores", "'renorm'", "paper", "free"]),
    "heads not grouped": ({"n_head": 6, "n_kv_head": 4}, ["n_head (6)", "multiple", "n_kv_head (4)"]),
    "odd head dim": ({"head_dim": 33}, ["head_dim (33)", "even", "RoPE"]),
    "l not a multiple of d": ({"cmp_block": 24, "cmp_stride": 16}, ["cmp_block", "(24)", "cmp_stride", "(16)"]),
    "l' not a multiple of d": ({"slc_block": 40}, ["slc_block", "(40)", "multiple", "cmp_stride", "(16)"]),
    "forced blocks exceed n": ({"top_n": 2}, ["top_n (2)", "init_blocks + local_blocks", "1 + 2"]),
    "forced blocks exceed n (custom)": ({"top_n": 4, "init_blocks": 3, "local_blocks": 2}, ["top_n (4)", "3 + 2"]),
    "vocabulary smaller than the tokenizer": ({"vocab_size": 256}, ["vocab_size (256)", "260"]),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_combinations_name_the_rule_and_the_values(name):
    fields, expected = INVALID[name]
    with pytest.raises(ConfigError) as err:
        NSAConfig(**fields)
    for text in expected:
        assert text in str(err.value), f"{text!r} missing from: {err.value}"
    # The same rule applies to a config read from JSON.
    with pytest.raises(ConfigError):
        NSAConfig.from_dict({**NSAConfig().to_dict(), **fields})


@pytest.mark.parametrize(("data", "expected"), [
    ({"n_layers": 4}, ["unknown config key", "n_layers"]),
    ({"model_type": "gpt2"}, ["model_type", "'gpt2'", MODEL_TYPE]),
    ({"format_version": 99}, ["format_version", "99", str(FORMAT_VERSION)]),
])
def test_bad_json_documents_are_refused(data, expected):
    with pytest.raises(ConfigError) as err:
        NSAConfig.from_json(json.dumps({**NSAConfig().to_dict(), **data}))
    for text in expected:
        assert text in str(err.value)


def test_malformed_json_and_non_objects_are_refused():
    with pytest.raises(ConfigError, match="not valid JSON"):
        NSAConfig.from_json('{"n_layer": 4')
    with pytest.raises(ConfigError, match="JSON object, got list"):
        NSAConfig.from_json("[1, 2]")
