"""The command line: every command run as a subprocess on small inputs, including its bad-input paths.

Results are checked against independent computations (the library's own API called directly, a
linear solve, brute-force Jacobians); user mistakes must end in one line on stderr and exit status 2.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ntkit
from ntkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NTKIT_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "ntkit", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


class _Proc:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def inproc(*args, cwd):
    """main() in this process (same code path as the console script, without interpreter start-up)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse
                code = exc.code
    finally:
        os.chdir(old)
    return _Proc(code, out.getvalue(), err.getvalue())


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for frag in fragments:
        assert frag in last, last


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    xtr, ytr, xte = rng.standard_normal((12, 3)), rng.standard_normal((12, 2)), rng.standard_normal((4, 3))
    for name, arr in (("xtr", xtr), ("ytr", ytr), ("xte", xte)):
        np.save(d / f"{name}.npy", arr)
    np.savetxt(d / "xte.csv", xte, delimiter=",", header="a,b,c", comments="")
    np.savez(d / "both.npz", xtr=xtr, xte=xte)
    np.save(d / "labels.npy", rng.integers(0, 3, 12))
    np.save(d / "labels_te.npy", rng.integers(0, 3, 4))
    np.save(d / "x1d.npy", rng.standard_normal(5))
    arch = ntkit.mlp(2, activation=ntkit.Erf(), W_std=1.3, b_std=0.1)
    (d / "arch.json").write_text(json.dumps(arch.to_config()))
    (d / "broken.json").write_text('{"layers": [{"layer": "dense", "out_dim": 4')
    (d / "unknown.json").write_text(json.dumps({"layers": [{"layer": "no_such_layer"}]}))
    (d / "mymodel.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()\n"
        "def not_a_model():\n"
        "    return 3\n")
    return d, arch, xtr, ytr, xte


def test_help_everywhere_has_an_example(files):
    d = files[0]
    top = run("--help", cwd=d)
    assert top.returncode == 0 and "example" in top.stdout
    for cmd in ("demo", "kernel", "predict", "spectrum", "empirical", "report"):
        proc = inproc(cmd, "--help", cwd=d)
        assert proc.returncode in (0, None), cmd
        assert "example:" in proc.stdout and f"ntkit {cmd}" in proc.stdout, cmd
        assert "--seed" in proc.stdout and "--device" in proc.stdout and "--dtype" in proc.stdout
    assert inproc("uci", "--help", cwd=d).returncode in (0, None)


def test_kernel_command_matches_the_library(files, tmp_path):
    d, arch, xtr, ytr, xte = files
    assert main(["kernel", "--config", str(d / "arch.json"), "--x1", str(d / "xte.npy"), "--x2",
                 str(d / "xtr.npy"), "--out", str(tmp_path / "k.npz")]) == 0
    k = np.load(tmp_path / "k.npz")
    np.testing.assert_allclose(k["ntk"], arch.kernel(xte, xtr, "ntk").numpy(), rtol=1e-14)
    # csv with a header, an npz member, a folder output with results.json and report.html
    proc = run("kernel", "--config", "arch.json", "--x1", "xte.csv", "--x2", "both.npz:xtr", "--get", "ntk",
               "--dtype", "float32", "--out", tmp_path / "kdir", cwd=d)
    assert proc.returncode == 0, proc.stderr
    arr = np.load(tmp_path / "kdir/kernels.npz")["ntk"]
    assert arr.dtype == np.float32
    np.testing.assert_allclose(arr, arch.kernel(xte, xtr, "ntk").numpy(), rtol=1e-5)
    res = json.loads((tmp_path / "kdir/results.json").read_text())
    assert res["command"] == "kernel" and res["n1"] == 4 and res["n2"] == 12
    assert "<img" in (tmp_path / "kdir/report.html").read_text()
    assert proc.stdout.strip().splitlines()[-1].endswith("report.html")


def test_kernel_command_writes_resumable_zarr_stores(files, tmp_path):
    d, arch, xtr, ytr, xte = files
    proc = run("kernel", "--config", "arch.json", "--x1", "xtr.npy", "--store", tmp_path / "st", "--no-progress", cwd=d)
    assert proc.returncode == 0, proc.stderr
    import zarr

    for g in ("nngp", "ntk"):
        got = zarr.open_array(str(tmp_path / "st" / f"{g}.zarr"), mode="r")[...]
        np.testing.assert_allclose(got, arch.kernel(xtr, get=g).numpy(), rtol=1e-12)
    again = run("kernel", "--config", "arch.json", "--x1", "xtr.npy", "--store", tmp_path / "st", "--no-progress",
                cwd=d)  # a finished store: the same command only checks it
    assert again.returncode == 0, again.stderr
    # a store of other inputs is refused with one line, and a file is not a folder
    assert_user_error(inproc("kernel", "--config", "arch.json", "--x1", "xte.npy", "--store", str(tmp_path / "st"),
                             cwd=d), "ntk")
    (tmp_path / "f").write_text("x")
    assert_user_error(inproc("kernel", "--config", "arch.json", "--x1", "xtr.npy", "--store", str(tmp_path / "f"),
                             cwd=d), "not a folder")


def test_kernel_command_user_errors(files):
    d = files[0]
    assert_user_error(run("kernel", "--config", "nope.json", "--x1", "xtr.npy", cwd=d), "nope.json", "not found")
    assert_user_error(inproc("kernel", "--config", "broken.json", "--x1", "xtr.npy", cwd=d), "--config broken.json")
    assert_user_error(inproc("kernel", "--config", "unknown.json", "--x1", "xtr.npy", cwd=d), "--config unknown.json")
    assert_user_error(inproc("kernel", "--config", "arch.json", "--x1", "missing.npy", cwd=d), "--x1", "not found")
    assert_user_error(inproc("kernel", "--config", "arch.json", "--x1", "xtr.npy", "--x2", "ytr.npy", cwd=d),
                      "must match")
    assert_user_error(inproc("kernel", "--config", "arch.json", "--x1", "both.npz", cwd=d), "choose one")
    assert_user_error(inproc("kernel", "--config", "arch.json", "--x1", "x1d.npy", cwd=d), "2-d")
    assert_user_error(inproc("kernel", "--config", "arch.json", "--x1", "xtr.npy", "--get", "foo", cwd=d), "--get")
    assert_user_error(inproc("kernel", "--config", "arch.json", "--x1", "arch.json", cwd=d), "unknown extension")
    bad = inproc("kernel", "--config", "arch.json", "--x1", "xtr.npy", "--bogus", cwd=d)
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr and "Traceback" not in bad.stderr
    assert_user_error(inproc("kernel", "--config", "arch.json", "--x1", "xtr.npy", "--device", "cuda:7", cwd=d),
                      "--device")


def test_predict_mse_matches_kernel_regression(files, tmp_path):
    d, arch, xtr, ytr, xte = files
    proc = run("predict", "--config", "arch.json", "--x-train", "xtr.npy", "--y-train", "ytr.npy", "--x-test",
               "xte.npy", "--times", "0,inf", "--out", tmp_path / "p.npz", cwd=d)
    assert proc.returncode == 0, proc.stderr
    p = np.load(tmp_path / "p.npz")
    # t = 0: the ensemble mean is 0; t = inf: kernel regression K* K^-1 y (independent linear solve)
    np.testing.assert_allclose(p["test"][0], 0.0, atol=1e-12)
    K = arch.kernel(xtr, get="ntk").numpy()
    Ks = arch.kernel(xte, xtr, get="ntk").numpy()
    np.testing.assert_allclose(p["test"][1], Ks @ np.linalg.solve(K, ytr), rtol=1e-6, atol=1e-8)


def test_predict_cross_entropy_with_report(files, tmp_path):
    d, arch, xtr, ytr, xte = files
    proc = inproc("predict", "--config", "arch.json", "--x-train", "xtr.npy", "--y-train", "labels.npy", "--x-test",
               "xte.npy", "--y-test", "labels_te.npy", "--loss", "cross_entropy", "--times", "0,1,3",
               "--learning-rate", "0.5", "--out", tmp_path / "pdir", cwd=d)
    assert proc.returncode == 0, proc.stderr
    p = np.load(tmp_path / "pdir/predictions.npz")
    assert p["test"].shape == (3, 4, 3)
    # independent check: the function-space ODE of cross-entropy integrated with the library's predictor
    from ntkit.dynamics import gradient_descent

    y = np.eye(3)[np.load(d / "labels.npy")]
    ref = gradient_descent("cross_entropy", arch.kernel(xtr, get="ntk"), y, learning_rate=0.5).predict(
        [0.0, 1.0, 3.0], arch.kernel(xte, xtr, get="ntk"))
    np.testing.assert_allclose(p["test"], ref.test.numpy(), rtol=1e-6, atol=1e-9)
    res = json.loads((tmp_path / "pdir/results.json").read_text())
    assert len(res["test_accuracy"]) == 3 and (tmp_path / "pdir/test_metric_vs_time.png").exists()


def test_predict_user_errors(files):
    d = files[0]
    base = ["predict", "--config", "arch.json", "--x-train", "xtr.npy", "--x-test", "xte.npy"]
    assert_user_error(run(*base, "--y-train", "ytr.npy", "--times", "0,abc", cwd=d), "--times", "'abc'")
    assert_user_error(inproc(*base, "--y-train", "ytr.npy", "--times", "-1", cwd=d), "negative")
    assert_user_error(inproc(*base, "--y-train", "labels_te.npy", cwd=d), "--y-train has 4 rows")
    assert_user_error(inproc(*base, "--y-train", "labels.npy", "--loss", "cross_entropy", "--times", "1,inf", cwd=d),
                      "t = inf")
    bad = inproc(*base, "--y-train", "ytr.npy", "--loss", "hinge", cwd=d)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_spectrum_command(files, tmp_path):
    d, arch, xtr, ytr, xte = files
    proc = run("spectrum", "--config", "arch.json", "--x", "xtr.npy", "--learning-rate", "2", "--out",
               tmp_path / "s", cwd=d)
    assert proc.returncode == 0, proc.stderr
    s = np.load(tmp_path / "s/spectrum.npz")
    ev = np.linalg.eigvalsh(arch.kernel(xtr, get="ntk").numpy())[::-1]  # independent: numpy's eigvalsh
    np.testing.assert_allclose(s["eigenvalues"], ev, rtol=1e-10)
    np.testing.assert_allclose(s["convergence_times"], 12 / (2 * ev), rtol=1e-10)  # m / (eta lambda)
    res = json.loads((tmp_path / "s/results.json").read_text())
    assert res["condition_number"] == pytest.approx(ev[0] / ev[-1], rel=1e-8)
    # a precomputed kernel file, and Mercer eigenvalues on the sphere (ReLU NTK: decay ~ k^-d, d = 3)
    np.savez(tmp_path / "k.npz", ntk=arch.kernel(xtr, get="ntk").numpy())
    proc = inproc("spectrum", "--kernel-file", f"{tmp_path / 'k.npz'}:ntk", "--out", tmp_path / "s2.npz", cwd=d)
    assert proc.returncode == 0 and "condition number" in proc.stdout
    relu = ntkit.mlp(2, activation="relu", W_std=2**0.5, b_std=0.0)
    (tmp_path / "relu.json").write_text(json.dumps(relu.to_config()))
    proc = inproc("spectrum", "--config", tmp_path / "relu.json", "--mercer-d", "3", "--mercer-kmax", "40", "--out",
               tmp_path / "m", cwd=d)
    assert proc.returncode == 0, proc.stderr
    expo = json.loads((tmp_path / "m/results.json").read_text())["mercer"]["decay_exponent"]
    assert -3.6 < expo < -2.6


def test_spectrum_user_errors(files, tmp_path):
    d = files[0]
    assert_user_error(run("spectrum", cwd=d), "either --config")
    assert_user_error(inproc("spectrum", "--config", "arch.json", cwd=d), "--x")
    assert_user_error(inproc("spectrum", "--kernel-file", "xtr.npy", cwd=d), "square")
    np.save(tmp_path / "asym.npy", np.arange(9.0).reshape(3, 3))
    assert_user_error(inproc("spectrum", "--kernel-file", tmp_path / "asym.npy", cwd=d), "not symmetric")
    np.save(tmp_path / "k.npy", np.eye(3))
    assert_user_error(inproc("spectrum", "--kernel-file", tmp_path / "k.npy", "--mercer-d", "3", cwd=d), "--mercer-d")


def _jacobian_ntk(model, x1, x2):
    """Brute force: Theta = J(x1) J(x2)^T / k from torch.autograd.functional.jacobian."""
    params = dict(model.named_parameters())

    def flat_jac(x):
        def f(*ps):
            return torch.func.functional_call(model, dict(zip(params, ps)), (x,))

        jac = torch.autograd.functional.jacobian(f, tuple(params.values()))
        n, k = x.shape[0], jac[0].shape[1]
        return torch.cat([j.reshape(n, k, -1) for j in jac], dim=2)

    j1, j2 = flat_jac(x1), flat_jac(x2)
    return torch.einsum("iap,jap->ij", j1, j2) / j1.shape[1]


def test_empirical_command_module_function_and_torchscript(files, tmp_path):
    d, arch, xtr, ytr, xte = files
    sys.path.insert(0, str(d))
    try:
        import mymodel
    finally:
        sys.path.remove(str(d))
    model = mymodel.build()
    ref = _jacobian_ntk(model, torch.as_tensor(xte), torch.as_tensor(xtr)).numpy()
    proc = run("empirical", "--model", "mymodel:build", "--x1", "xte.npy", "--x2", "xtr.npy", "--out",
               tmp_path / "e1.npz", cwd=d)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "e1.npz")["ntk"], ref, rtol=1e-10, atol=1e-12)
    torch.jit.script(model).save(str(tmp_path / "model.pt"))
    proc = inproc("empirical", "--model", tmp_path / "model.pt", "--x1", "xte.npy", "--x2", "xtr.npy", "--out",
               tmp_path / "edir", cwd=d)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "edir/empirical_ntk.npz")["ntk"], ref, rtol=1e-10, atol=1e-12)
    assert (tmp_path / "edir/report.html").exists()
    full = inproc("empirical", "--model", "mymodel:build", "--x1", "xte.npy", "--output", "full", "--out",
               tmp_path / "f.npz", cwd=d)
    assert full.returncode == 0 and np.load(tmp_path / "f.npz")["ntk"].shape == (4, 4, 2, 2)


def test_empirical_user_errors(files, tmp_path):
    d = files[0]
    assert_user_error(run("empirical", "--model", "mymodel:nope", "--x1", "xte.npy", cwd=d), "no function 'nope'")
    assert_user_error(inproc("empirical", "--model", "nomodule:build", "--x1", "xte.npy", cwd=d), "cannot import")
    assert_user_error(inproc("empirical", "--model", "mymodel:not_a_model", "--x1", "xte.npy", cwd=d),
                      "not a torch.nn.Module")
    assert_user_error(inproc("empirical", "--model", "missing.pt", "--x1", "xte.npy", cwd=d), "not found")
    assert_user_error(inproc("empirical", "--model", "xtr.npy", "--x1", "xte.npy", cwd=d), "not a TorchScript file")
    assert_user_error(inproc("empirical", "--model", "mymodel:build", "--x1", "ytr.npy", cwd=d), "model")
    assert_user_error(inproc("empirical", "--model", "justaname", "--x1", "xte.npy", cwd=d), "module:function")


def test_report_command_rerenders_and_builds(files, tmp_path):
    d = files[0]
    assert inproc("spectrum", "--config", "arch.json", "--x", "xtr.npy", "--out", tmp_path / "s", cwd=d).returncode == 0
    before = (tmp_path / "s/report.html").read_text()
    (tmp_path / "s/report.html").unlink()
    proc = run("report", tmp_path / "s", cwd=d)
    assert proc.returncode == 0, proc.stderr
    after = (tmp_path / "s/report.html").read_text()
    assert after.count("<img") == before.count("<img") == 1
    proc = inproc("report", tmp_path / "s/results.json", "--out", tmp_path / "copy", "--title", "Renamed", cwd=d)
    assert proc.returncode == 0 and "Renamed" in (tmp_path / "copy/report.html").read_text()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign/results.json").write_text(json.dumps({"accuracy": 0.93}))
    assert inproc("report", tmp_path / "foreign", cwd=d).returncode == 0
    assert "0.93" in (tmp_path / "foreign/report.html").read_text()
    assert_user_error(run("report", tmp_path / "nowhere", cwd=d), "not found")
    (tmp_path / "empty").mkdir()
    assert_user_error(inproc("report", tmp_path / "empty", cwd=d), "no results.json")


def test_reproduce_is_delegated(files, monkeypatch, capsys):
    import types

    seen = {}
    fake = types.ModuleType("ntkit.experiments.reproduce")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "ntkit.experiments.reproduce", fake)
    assert main(["reproduce", "--list", "x"]) == 0 and seen["argv"] == ["--list", "x"]
    monkeypatch.setitem(sys.modules, "ntkit.experiments.reproduce", None)  # absent module
    assert main(["reproduce"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not part of this installation" in err[0]


def test_no_command_prints_help(files):
    proc = run(cwd=files[0])
    assert proc.returncode == 2 and "usage: ntkit" in proc.stdout


def test_uci_and_reproduce_as_subprocesses(files, tmp_path):
    d = files[0]
    data = ROOT / "tests" / "data" / "uci"
    proc = run("uci", "--data", data, "--list", cwd=d)
    assert proc.returncode == 0 and {"iris", "zoo"} <= set(proc.stdout.split())
    bad = run("uci", "--data", tmp_path / "nowhere", "--out", tmp_path / "o", cwd=d)
    assert bad.returncode == 2 and "is not a directory" in bad.stderr.strip().splitlines()[-1]
    assert "Traceback" not in bad.stderr
    rep = run("reproduce", "--help", cwd=d)
    # delegated to ntkit.experiments.reproduce when installed; otherwise one clear line
    assert (rep.returncode == 0 and "usage" in rep.stdout) or (
        rep.returncode == 2 and "not part of this installation" in rep.stderr)
