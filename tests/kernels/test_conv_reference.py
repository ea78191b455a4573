"""Convolutional reference cases beyond the plain kernel matrices: the automatic spatial layout against
the full pixel-pair computation, the diagonal mode, NCHW inputs, float32, tiling and configs."""

import json

import numpy as np
import pytest
import torch

import ntkit
from conftest import REFERENCE_DIR, load_reference

SPATIAL = sorted(p for p in REFERENCE_DIR.glob("1*.npz") if "conv" in p.stem)


def _err(got, ref):
    return float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("path", SPATIAL, ids=[p.stem for p in SPATIAL])
def test_automatic_layout_equals_pixel_pairs_and_diagonal_mode(path, single_thread):
    cfg, z = load_reference(path)
    arch = ntkit.from_config(cfg)
    auto = arch.kernel(z["x1"], z["x2"])
    full = arch.kernel(z["x1"], z["x2"], pixel_pairs=True)
    for name in ("nngp", "ntk"):
        # the same numbers up to rounding (the automatic choice drops pixel pairs after the last pooling)
        assert _err(getattr(auto, name), getattr(full, name).numpy()) < 1e-13
        assert _err(getattr(full, name), z[f"{name}_x1_x2"]) < 1e-6
    # k(x, x) alone, and pairwise k(x1_i, x2_i)
    diag = arch.kernel(z["x2"], get="ntk", diagonal=True)
    assert _err(diag, np.diag(z["ntk_x2_x2"])) < 1e-6
    pair = arch.kernel(z["x1"], z["x2"][:10], get="nngp", diagonal=True)
    assert _err(pair, np.diag(z["nngp_x1_x2"][:, :10])) < 1e-6


def test_pixel_pairs_false_is_refused_with_pooling():
    cfg, z = load_reference(REFERENCE_DIR / "100_conv_same_relu_gap_4x4x2_ntk.npz")
    with pytest.raises(ntkit.ConfigError, match="global_avg_pool"):
        ntkit.from_config(cfg).kernel(z["x1"], pixel_pairs=False)


def test_nchw_float32_tiles_and_config_round_trip(single_thread):
    cfg, z = load_reference(REFERENCE_DIR / "102_conv2_same_erf_strided_relu_gap_6x6x1_ntk.npz")
    arch = ntkit.from_config(cfg)
    ref = z["ntk_x1_x2"]
    nchw = arch.kernel(torch.as_tensor(z["x1"]).permute(0, 3, 1, 2), torch.as_tensor(z["x2"]).permute(0, 3, 1, 2),
                       get="ntk", layout="NCHW")
    assert _err(nchw, ref) < 1e-6
    f32 = arch.kernel(z["x1"], z["x2"], get="ntk", dtype=torch.float32)
    assert f32.dtype == torch.float32 and _err(f32, ref) < 1e-4
    tiled = arch.kernel(z["x2"], get="ntk", block_size=3)  # uneven tiles, symmetric mirroring
    assert _err(tiled, z["ntk_x2_x2"]) < 1e-6 and torch.equal(tiled, tiled.T)
    again = ntkit.from_config(json.dumps(arch.to_config()))
    assert again == arch


def test_memory_budget_bounds_the_tile(single_thread):
    cfg, z = load_reference(REFERENCE_DIR / "100_conv_same_relu_gap_4x4x2_ntk.npz")
    arch = ntkit.from_config(cfg)
    # 4x4 images: 256 numbers per pair with pixel pairs; a budget of 1 MB forces tiles of a few rows
    small = arch.kernel(z["x2"], get="nngp", memory_budget=1e6)
    assert _err(small, z["nngp_x2_x2"]) < 1e-6
    with pytest.raises(ntkit.MemoryBudgetError):
        arch.kernel(z["x2"], get="nngp", memory_budget=1e4)


def test_progress_bar_is_silent_off_a_terminal(capsys, single_thread):
    cfg, z = load_reference(REFERENCE_DIR / "101_conv_valid_relu_flatten_6x6x1_ntk.npz")
    arch = ntkit.from_config(cfg)
    k = arch.kernel(z["x2"], get="ntk", block_size=4, progress=True)
    assert _err(k, z["ntk_x2_x2"]) < 1e-6
    d = arch.kernel(z["x2"], get="ntk", diagonal=True, progress=True)
    assert _err(d, np.diag(z["ntk_x2_x2"])) < 1e-6
    assert capsys.readouterr().err == ""
