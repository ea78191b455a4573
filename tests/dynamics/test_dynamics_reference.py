"""The four predictions of every fully-connected neural-tangents reference case (NTK / NNGP, t = inf and
finite t), reproduced through the public API from the stored kernels, to 1e-6 relative (README of the
reference: loss = mean over all entries of (f - y)^2 / 2, relative diagonal regularizer)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ntkit.dynamics import gradient_descent_mse, gradient_descent_mse_ensemble

DATA = Path(__file__).resolve().parents[1] / "data" / "reference"  # shared with tests/kernels
CASES = sorted(DATA.glob("*.npz"))


def _close(a, b, tol=1e-6):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err <= tol, f"max|a-b|/max|b| = {err:.3g}"


def test_cases_present():
    assert len(CASES) >= 100  # every FC case (no conv / pool / flatten / layer_norm)


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_reference_predictions(path):
    z = np.load(path)
    cfg = json.loads(str(z["config"]))
    pr = cfg["predict"]
    assert pr["diag_reg_absolute_scale"] is False
    t, lr, reg = float(z["t"]), float(z["learning_rate"]), float(z["diag_reg"])
    for regime in ("ntk", "nngp"):
        pred = gradient_descent_mse(z[f"{regime}_x2_x2"], z["y_train"], learning_rate=lr, diag_reg=reg)
        out = pred.predict([t, np.inf], k_test_train=z[f"{regime}_x1_x2"]).test
        _close(out[0].numpy(), z[f"predict_{regime}_t"])
        _close(out[1].numpy(), z[f"predict_{regime}_inf"])


@pytest.mark.parametrize("path", CASES[:3] + CASES[40:41], ids=lambda p: p.stem)
def test_reference_ensemble_mean(path):
    """The ensemble predictor's mean is the same object (NNGP regime and NTK regime)."""
    z = np.load(path)
    t, lr, reg = float(z["t"]), float(z["learning_rate"]), float(z["diag_reg"])
    ens = gradient_descent_mse_ensemble(z["y_train"], z["nngp_x2_x2"], z["nngp_x1_x2"], z["nngp_x1_x1"],
                                        ntk_train_train=z["ntk_x2_x2"], ntk_test_train=z["ntk_x1_x2"],
                                        learning_rate=lr, diag_reg=reg)
    mean = ens.predict([t, np.inf], compute_cov=False).mean
    _close(mean[0].numpy(), z["predict_ntk_t"])
    _close(mean[1].numpy(), z["predict_ntk_inf"])
    ens = gradient_descent_mse_ensemble(z["y_train"], z["nngp_x2_x2"], z["nngp_x1_x2"], z["nngp_x1_x1"],
                                        learning_rate=lr, diag_reg=reg)
    _close(ens.predict(t, compute_cov=False).mean.numpy(), z["predict_nngp_t"])


@pytest.mark.parametrize("path", [CASES[1], CASES[6], CASES[83]], ids=lambda p: p.stem)
def test_reference_through_architecture(path):
    """Kernel function path: arch = ntkit.from_config(cfg); kernels computed by ntkit, not read."""
    ntkit = pytest.importorskip("ntkit")
    if not hasattr(ntkit, "from_config"):
        pytest.skip("core not available")
    z = np.load(path)
    cfg = json.loads(str(z["config"]))
    arch = ntkit.from_config(cfg)
    t, lr, reg = float(z["t"]), float(z["learning_rate"]), float(z["diag_reg"])
    for regime in ("ntk", "nngp"):
        pred = gradient_descent_mse(arch.kernel_fn(regime), z["y_train"], x_train=z["x2"], learning_rate=lr,
                                    diag_reg=reg)
        out = pred.predict([t, np.inf], x_test=z["x1"]).test
        _close(out[0].numpy(), z[f"predict_{regime}_t"])
        _close(out[1].numpy(), z[f"predict_{regime}_inf"])
    # one path through arch.kernel as matrices, NTK-GP ensemble
    from ntkit.dynamics import ensemble_from_architecture

    ens = ensemble_from_architecture(arch, torch.as_tensor(z["x2"]), z["y_train"], torch.as_tensor(z["x1"]),
                                     learning_rate=lr, diag_reg=reg)
    _close(ens.predict(t, compute_cov=False).mean.numpy(), z["predict_ntk_t"])
