"""Architectures round-trip through dict, JSON string, JSON file and YAML file."""

import json

import numpy as np
import pytest
import torch
import yaml

import ntkit

ALL_LAYERS = ntkit.serial(
    ntkit.Dense(8, 1.3, 0.2), ntkit.Relu(),
    ntkit.Dense(8, 1.1, None), ntkit.LeakyRelu(0.1),
    ntkit.Dense(8, 1.2, 0.0, trainable=False), ntkit.ABRelu(-0.3, 1.2),
    ntkit.Dense(8, 1.0, 0.1), ntkit.Abs(),
    ntkit.Dense(8, 1.0, 0.1), ntkit.Erf(1.1, 0.9, 0.1),
    ntkit.Dense(8, 1.0, 0.1), ntkit.Gelu(),
    ntkit.Dense(8, 1.0, 0.1), ntkit.Sin(1.0, 0.7, 0.2),
    ntkit.Dense(8, 1.0, 0.1), ntkit.Cos(1.0, 0.7, 0.2),
    ntkit.Dense(8, 1.0, 0.1), ntkit.Rbf(0.4),
    ntkit.Dense(8, 0.5, 0.1), ntkit.Exp(0.5, 0.3),
    ntkit.Dense(8, 1.0, 0.1), ntkit.Gaussian(1.0, -0.5),
    ntkit.Dense(8, 1.0, 0.1), ntkit.Monomial(2),
    ntkit.Dense(8, 0.5, 0.1), ntkit.Polynomial((0.1, 1.0, 0.2)),
    ntkit.Dense(8, 1.0, 0.1), ntkit.Elementwise("tanh"),
    ntkit.Dense(8, 1.0, 0.1), ntkit.residual(ntkit.Relu(), ntkit.Dense(8, 1.0, 0.1)),
    ntkit.Dense(8, 1.0, 0.1), ntkit.Sign(),
    ntkit.Dense(2, 1.0, 0.0),
    parameterization="standard", input_dim=3,
)


def _same_kernels(a, b):
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ka, kb = a.kernel(x), b.kernel(x)
    torch.testing.assert_close(ka.nngp, kb.nngp, rtol=0, atol=0)
    torch.testing.assert_close(ka.ntk, kb.ntk, rtol=0, atol=0)


def test_dict_round_trip():
    cfg = ALL_LAYERS.to_config()
    names = {layer["layer"] for layer in cfg["layers"]}
    assert {"dense", "relu", "leaky_relu", "abrelu", "abs", "erf", "gelu", "sin", "cos", "rbf", "exp", "gaussian",
            "monomial", "polynomial", "numerical", "serial", "sign"} <= names
    back = ntkit.from_config(cfg)
    assert back == ALL_LAYERS
    assert back.to_config() == cfg
    _same_kernels(back, ALL_LAYERS)


def test_json_string_and_files(tmp_path):
    cfg = ALL_LAYERS.to_config()
    text = json.dumps(cfg)
    assert ntkit.from_config(text) == ALL_LAYERS
    p = tmp_path / "arch.json"
    p.write_text(text)
    assert ntkit.from_config(str(p)) == ALL_LAYERS
    assert ntkit.from_config(p) == ALL_LAYERS
    y = tmp_path / "arch.yaml"
    y.write_text(yaml.safe_dump(cfg))
    assert ntkit.from_config(y) == ALL_LAYERS
    assert ntkit.from_config(yaml.safe_dump(cfg)) == ALL_LAYERS


def test_reference_schema_fanout_parallel():
    cfg = {"parameterization": "ntk", "layers": [
        {"layer": "dense", "out_dim": 16, "W_std": 1.2, "b_std": 0.1},
        {"layer": "fanout", "num": 2},
        {"layer": "parallel", "branches": [[{"layer": "relu"}, {"layer": "dense", "out_dim": 16, "W_std": 1.0,
                                              "b_std": 0.0}], [{"layer": "identity"}]]},
        {"layer": "fanin_sum"},
        {"layer": "dense", "out_dim": 1, "W_std": 1.0, "b_std": 0.0}]}
    arch = ntkit.from_config(cfg)
    assert arch.to_config()["layers"] == cfg["layers"]
    manual = ntkit.serial(ntkit.Dense(16, 1.2, 0.1), ntkit.residual(ntkit.Relu(), ntkit.Dense(16, 1.0, 0.0)),
                          ntkit.Dense(1, 1.0, 0.0))
    _same_kernels(arch, manual)


def test_unnamed_function_cannot_be_serialised():
    arch = ntkit.serial(ntkit.Dense(4), ntkit.Elementwise(lambda x: x * torch.sigmoid(x)), ntkit.Dense(1))
    with pytest.raises(ntkit.ConfigError, match="cannot be written to a config"):
        arch.to_config()


def test_elementwise_settings_round_trip_and_trainable_must_be_boolean():
    arch = ntkit.serial(ntkit.Dense(None, 1.0, 0.1), ntkit.Elementwise("tanh", deg=500, max_order=300, tol=1e-12),
                        ntkit.Dense(1, 1.0))
    back = ntkit.from_config(arch.to_config())
    assert back == arch and back.to_config() == arch.to_config()
    # a neural-tangents config (no "tol") still gets at least 2000 nodes
    nt_style = ntkit.from_config({"layers": [{"layer": "dense", "W_std": 1.0, "b_std": 0.0},
                                             {"layer": "numerical", "fn": "tanh", "deg": 25}]})
    assert nt_style.layers[1].deg == 2000
    with pytest.raises(ntkit.ConfigError, match="trainable must be true or false"):
        ntkit.from_config({"layers": [{"layer": "dense", "W_std": 1.0, "b_std": 0.0, "trainable": "no"}]})
