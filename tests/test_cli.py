"""The command line: demo runs, and kernel/predict write what the library computes."""

import json

import numpy as np
import torch

import ntkit
from ntkit.cli import main


def test_demo_runs(capsys):
    assert main(["demo", "--n", "4", "--d", "3", "--depth", "1", "--widths", "16", "64", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "Theta(x, x) = 2.000000" in out  # 2 Dense layers, sigma_w^2 = 2, |x|^2 = d


def test_kernel_and_predict_commands(tmp_path):
    rng = np.random.default_rng(0)
    xtr, ytr, xte = rng.standard_normal((12, 3)), rng.standard_normal((12, 2)), rng.standard_normal((4, 3))
    for name, arr in (("xtr", xtr), ("ytr", ytr), ("xte", xte)):
        np.save(tmp_path / f"{name}.npy", arr)
    arch = ntkit.mlp(2, activation=ntkit.Erf(), W_std=1.3, b_std=0.1)
    (tmp_path / "arch.json").write_text(json.dumps(arch.to_config()))
    assert main(["kernel", "--config", str(tmp_path / "arch.json"), "--x1", str(tmp_path / "xte.npy"),
                 "--x2", str(tmp_path / "xtr.npy"), "--out", str(tmp_path / "k.npz")]) == 0
    k = np.load(tmp_path / "k.npz")
    np.testing.assert_allclose(k["ntk"], arch.kernel(xte, xtr, "ntk").numpy(), rtol=1e-14)
    assert main(["predict", "--config", str(tmp_path / "arch.json"), "--x-train", str(tmp_path / "xtr.npy"),
                 "--y-train", str(tmp_path / "ytr.npy"), "--x-test", str(tmp_path / "xte.npy"),
                 "--times", "0,inf", "--out", str(tmp_path / "p.npz")]) == 0
    p = np.load(tmp_path / "p.npz")
    # t = 0: the ensemble mean is 0; t = inf: kernel regression K* K^-1 y (independent linear solve)
    np.testing.assert_allclose(p["test"][0], 0.0, atol=1e-12)
    K = arch.kernel(xtr, get="ntk").numpy()
    Ks = arch.kernel(xte, xtr, get="ntk").numpy()
    np.testing.assert_allclose(p["test"][1], Ks @ np.linalg.solve(K, ytr), rtol=1e-6, atol=1e-8)
