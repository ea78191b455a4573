"""Architectures to and from JSON/YAML-able dicts (the layer schema of neural-tangents' reference set)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from .._validation import ConfigError
from .activations import (ABRelu, Abs, Cos, Elementwise, Erf, Exp, Gaussian, Gelu, LeakyRelu, Monomial, Polynomial,
                          Rbf, Relu, Sign, Sin)
from .architecture import Architecture
from .conv import Conv
from .layers import Dense, FanInSum, FanOut, Identity, Layer, Parallel, Serial
from .normalization import LayerNorm
from .pooling import AvgPool, Flatten, GlobalAvgPool
from .recurrent import RNN

__all__ = ["from_config", "layer_from_config", "LAYER_SCHEMA"]


def _float(name):
    def conv(v, where):
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: field {name!r} must be a number, got {v!r}") from None
    return conv


def _any(name):
    return lambda v, where: v


def _branches(v, where):
    if not isinstance(v, (list, tuple)):
        raise ConfigError(f"{where}: 'branches' must be a list of layer lists")
    out = []
    for i, br in enumerate(v):
        if isinstance(br, dict):
            br = [br]
        if not isinstance(br, (list, tuple)):
            raise ConfigError(f"{where}: branch {i} must be a list of layer dicts")
        out.append([layer_from_config(d, f"{where}.branches[{i}][{j}]") for j, d in enumerate(br)])
    return out


def _layer_norm(eps, axis):
    if axis not in (-1, [-1], (-1,)):
        raise ConfigError(f"layer_norm normalises over the channel axis only (axis -1), got axis {axis!r}")
    return LayerNorm(eps)


def _activation(v, where):
    layer = layer_from_config(v, f"{where}.activation") if isinstance(v, dict) else layer_from_config(
        {"layer": v}, f"{where}.activation") if isinstance(v, str) else None
    if layer is None:
        raise ConfigError(f"{where}: 'activation' must be an activation layer dict such as {{'layer': 'erf', 'a': 1, "
                          f"'b': 1, 'c': 0}}, got {v!r}")
    return layer


# name -> (builder(**fields), required fields with converters, optional fields with converters and defaults)
LAYER_SCHEMA: dict[str, tuple[Callable[..., Layer], dict, dict]] = {
    "dense": (lambda out_dim=None, W_std=1.0, b_std=0.0, trainable=True: Dense(out_dim, W_std, b_std, trainable),
              {"W_std": _any("W_std"), "b_std": _any("b_std")},
              {"out_dim": (_any("out_dim"), None), "trainable": (_any("trainable"), True)}),
    "conv": (lambda filter_shape, W_std=1.0, b_std=0.0, out_chan=None, strides=None, padding="VALID", trainable=True:
             Conv(out_chan, filter_shape, strides, padding, W_std, b_std, trainable),
             {"filter_shape": _any("filter_shape"), "W_std": _any("W_std"), "b_std": _any("b_std")},
             {"out_chan": (_any("out_chan"), None), "strides": (_any("strides"), None),
              "padding": (_any("padding"), "VALID"), "trainable": (_any("trainable"), True)}),
    "avg_pool": (lambda window_shape, strides=None, padding="VALID": AvgPool(window_shape, strides, padding),
                 {"window_shape": _any("window_shape")},
                 {"strides": (_any("strides"), None), "padding": (_any("padding"), "VALID")}),
    "global_avg_pool": (GlobalAvgPool, {}, {}),
    "flatten": (Flatten, {}, {}),
    "layer_norm": (lambda eps=1e-12, axis=-1: _layer_norm(eps, axis), {},
                   {"eps": (_float("eps"), 1e-12), "axis": (_any("axis"), -1)}),
    "relu": (Relu, {}, {}),
    "abs": (Abs, {}, {}),
    "gelu": (Gelu, {}, {}),
    "sign": (Sign, {}, {}),
    "identity": (Identity, {}, {}),
    "fanin_sum": (FanInSum, {}, {}),
    "leaky_relu": (LeakyRelu, {"alpha": _float("alpha")}, {}),
    "abrelu": (ABRelu, {"a": _float("a"), "b": _float("b")}, {}),
    "erf": (Erf, {"a": _float("a"), "b": _float("b"), "c": _float("c")}, {}),
    "sin": (Sin, {"a": _float("a"), "b": _float("b"), "c": _float("c")}, {}),
    "cos": (Cos, {"a": _float("a"), "b": _float("b"), "c": _float("c")}, {}),
    "rbf": (Rbf, {"gamma": _float("gamma")}, {}),
    "exp": (Exp, {"a": _float("a"), "b": _float("b")}, {}),
    "gaussian": (Gaussian, {"a": _float("a"), "b": _float("b")}, {}),
    "monomial": (Monomial, {"degree": _any("degree")}, {}),
    "polynomial": (lambda coef: Polynomial(tuple(coef)), {"coef": _any("coef")}, {}),
    # In a neural-tangents config (no "tol"), "deg" is a lower bound on the number of quadrature nodes:
    # ntkit's 1-D rule needs more nodes than neural-tangents' 2-D rule for the same accuracy, and is cheap.
    # A config written by ntkit carries "max_order" and "tol", and its "deg" is taken as it is.
    "numerical": (lambda fn, deg=2000, max_order=None, tol=None: Elementwise(
                      fn, deg=int(deg) if tol is not None else max(int(deg), 2000),
                      max_order=1000 if max_order is None else int(max_order), tol=1e-13 if tol is None else tol),
                  {"fn": _any("fn")}, {"deg": (_any("deg"), 2000), "max_order": (_any("max_order"), None),
                                       "tol": (_any("tol"), None)}),
    "fanout": (FanOut, {"num": _any("num")}, {}),
    "parallel": (lambda branches: Parallel(branches), {"branches": _branches}, {}),
    # recurrent layer (ntkit.RNN): readout "sequence" feeds another rnn stacked on top
    "rnn": (lambda W_std, U_std, b_std, activation, out_dim=None, readout="last", bidirectional=False: RNN(
                out_dim, W_std, U_std, b_std, activation, readout, bidirectional),
            {"W_std": _any("W_std"), "U_std": _any("U_std"), "b_std": _any("b_std"), "activation": _activation},
            {"out_dim": (_any("out_dim"), None), "readout": (_any("readout"), "last"),
             "bidirectional": (_any("bidirectional"), False)}),
    "serial": (lambda layers: Serial([layer_from_config(d, "serial") for d in layers]),
               {"layers": _any("layers")}, {}),
}


def layer_from_config(cfg: dict, where: str = "layer") -> Layer:
    """Build one layer from its dict, e.g. ``{"layer": "erf", "a": 1, "b": 1, "c": 0}``."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: a layer must be a dict with a 'layer' key, got {cfg!r}")
    if "layer" not in cfg:
        raise ConfigError(f"{where}: missing key 'layer' in {cfg!r}")
    name = cfg["layer"]
    if name not in LAYER_SCHEMA:
        known = ", ".join(sorted(LAYER_SCHEMA))
        raise ConfigError(f"{where}: unknown layer {name!r}; known layers: {known}")
    builder, required, optional = LAYER_SCHEMA[name]
    where = f"{where} ({name})"
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ConfigError(f"{where}: missing key{'s' if len(missing) > 1 else ''} {missing}")
    unknown = [k for k in cfg if k != "layer" and k not in required and k not in optional]
    if unknown:
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {unknown}; "
                          f"allowed: {sorted(list(required) + list(optional))}")
    kwargs = {k: conv(cfg[k], where) for k, conv in required.items()}
    for k, (conv, default) in optional.items():
        kwargs[k] = conv(cfg[k], where) if k in cfg else default
    try:
        return builder(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _load(config: Any) -> dict:
    if isinstance(config, dict):
        return config
    if isinstance(config, os.PathLike):
        config = os.fspath(config)
    if not isinstance(config, str):
        raise ConfigError(f"config must be a dict, a JSON/YAML string or a path, got {type(config).__name__}")
    text = config
    stripped = config.strip()
    if not stripped.startswith(("{", "[")) and (os.path.exists(config) or config.endswith((".json", ".yaml", ".yml"))):
        if not os.path.exists(config):
            raise ConfigError(f"config file {config!r} does not exist")
        with open(config) as fh:
            text = fh.read()
        if config.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
            if not isinstance(data, dict):
                raise ConfigError(f"{config!r} does not hold a mapping")
            return data
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            import yaml

            data = yaml.safe_load(text)
        except Exception as exc:
            raise ConfigError(f"config is neither a path, JSON nor YAML: {exc}") from None
    if not isinstance(data, dict):
        if not stripped.startswith(("{", "[")) and "\n" not in stripped and ":" not in stripped:
            raise ConfigError(f"config {config!r} is neither an existing file nor a JSON/YAML mapping; pass a path "
                              "to a .json/.yaml file, a JSON string or a dict")
        raise ConfigError("config must describe a mapping with a 'layers' key")
    return data


def from_config(config: dict | str | os.PathLike) -> Architecture:
    """Build an :class:`Architecture` from a dict, a JSON/YAML string, or a path to a .json/.yaml file.

    Schema: ``{"parameterization": "ntk" | "standard", "layers": [{"layer": "dense", "out_dim": 512,
    "W_std": 1.4, "b_std": 0.1}, {"layer": "relu"}, ...], "input_dim": 784}`` — the layer schema of
    neural-tangents' reference README. Other top-level keys (``name``, ``seed``, ``predict``, ...)
    are ignored; ``input.shape1`` sets ``input_dim`` for flat inputs. Missing or unknown layer keys,
    unknown layer names and invalid values raise :class:`ConfigError`.
    """
    cfg = _load(config)
    if "layers" not in cfg:
        raise ConfigError(f"config is missing the 'layers' key (it has {sorted(cfg)})")
    if not isinstance(cfg["layers"], (list, tuple)):
        raise ConfigError("config 'layers' must be a list of layer dicts")
    param = cfg.get("parameterization", "ntk")
    input_dim = cfg.get("input_dim")
    inp = cfg.get("input")
    if input_dim is None and isinstance(inp, dict) and inp.get("layout", "NC") == "NC" and "shape1" in inp:
        input_dim = int(inp["shape1"][-1])
    layers = [layer_from_config(d, f"layers[{i}]") for i, d in enumerate(cfg["layers"])]
    return Architecture(layers, parameterization=param, input_dim=input_dim)
