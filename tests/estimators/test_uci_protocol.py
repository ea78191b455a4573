"""The UCI-90 runner (Arora et al. 2020 protocol) on 3 small data sets copied into tests/data/uci.

* loader: shapes, labels and splits against the metadata files;
* protocol: 4-fold test accuracies of every kernel method (full grids of the benchmark) and of a
  50-tree random forest against stored expectations (tests/data/uci/expected.json, produced by
  ``python tests/estimators/test_uci_protocol.py --regenerate``). The computation is deterministic
  on one machine; to stay robust to round-off elsewhere (an SVM fit or a tree split flipping one
  borderline sample) the tolerance admits at most one changed prediction: 1/(4 * smallest test
  fold) for the 4-fold accuracy (0.5% for iris) and 1/(validation size) for the validation accuracy.
  A wrong kernel, grid or selection rule changes many predictions and fails;
* resumability and the summary statistics (hand-computed table).
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ntkit.experiments.uci import (default_methods, list_uci_datasets, load_uci_dataset, run_uci, summarize,
                                   summary_markdown)

DATA = Path(__file__).resolve().parents[1] / "data" / "uci"
EXPECTED = DATA / "expected.json"
METHODS = ("ntk", "laplace", "gamma_exp", "rbf", "rf")


def ci_methods():
    allm = default_methods(rf_trees=50)
    return {k: allm[k] for k in METHODS}


def test_loader_reads_the_fernandez_delgado_format():
    assert list_uci_datasets(DATA) == ["hepatitis", "iris", "zoo"]
    ds = load_uci_dataset(DATA / "iris")
    assert ds.X.shape == (150, 4) and ds.n_classes == 3
    assert np.bincount(ds.y).tolist() == [50, 50, 50]
    assert len(ds.train_idx) + len(ds.val_idx) == 150 and not set(ds.train_idx) & set(ds.val_idx)
    assert len(ds.folds) == 4
    for tr, te in ds.folds:
        # each fold splits the data into disjoint train / test parts (the 4 test parts of this
        # preprocessing are 37 samples each, so 2 samples are never tested and 2 twice)
        assert not set(tr) & set(te) and len(tr) + len(te) == 150 and len(te) == 37
    with pytest.raises(FileNotFoundError, match="conxuntos"):
        load_uci_dataset(DATA / "no_such_set")


def test_protocol_reproduces_stored_accuracies(tmp_path):
    expected = json.loads(EXPECTED.read_text())
    summary = run_uci(DATA, tmp_path, methods=ci_methods(), progress=False)
    for name, accs in expected["accuracy"].items():
        ds = load_uci_dataset(DATA / name)
        tol_test = 1.0 / (4 * min(len(te) for _, te in ds.folds)) + 1e-12
        tol_val = 1.0 / len(ds.val_idx) + 1e-12
        res = json.loads((tmp_path / f"{name}.json").read_text())["methods"]
        for m in METHODS:
            assert res[m]["test_acc"] == pytest.approx(accs[m], abs=tol_test), (name, m)
            assert res[m]["val_acc"] == pytest.approx(expected["val_acc"][name][m], abs=tol_val), (name, m)
            # selection used the validation split only: the stored choice is the argmax there
            assert len(res[m]["fold_accs"]) == 4
    assert summary["n_datasets"] == 3
    assert (tmp_path / "summary.md").read_text().startswith("UCI: 3 data sets")


def test_run_is_resumable(tmp_path, monkeypatch):
    methods = {"rbf": default_methods()["rbf"]}
    first = run_uci(DATA, tmp_path, methods=methods, progress=False, datasets=["iris", "zoo"])

    def boom(self, ds):
        raise AssertionError("a finished data set was recomputed")

    monkeypatch.setattr(type(methods["rbf"]), "run", boom)
    again = run_uci(DATA, tmp_path, methods=methods, progress=False, datasets=["iris", "zoo"])
    assert again["methods"] == first["methods"]


def test_summary_statistics_by_hand():
    acc = {"a": {"x": 0.90, "y": 0.80, "z": 0.90},
           "b": {"x": 0.50, "y": 0.60, "z": 0.40},
           "c": {"x": 1.00, "y": 0.94, "z": 0.70}}
    s = summarize(acc)["methods"]
    # ranks per set (1 = best, ties averaged): a: x 1.5, y 3, z 1.5; b: y 1, x 2, z 3; c: x 1, y 2, z 3
    assert s["x"]["friedman_rank"] == pytest.approx((1.5 + 2 + 1) / 3)
    assert s["y"]["friedman_rank"] == pytest.approx((3 + 1 + 2) / 3)
    assert s["z"]["friedman_rank"] == pytest.approx((1.5 + 3 + 3) / 3)
    # ratios to the best: x: 1, 5/6, 1; y: 8/9, 1, 0.94; z: 1, 2/3, 0.7
    assert s["x"]["pma"] == pytest.approx(100 * (1 + 5 / 6 + 1) / 3)
    assert s["y"]["p90"] == pytest.approx(100 * 0 / 3 + 100 * 2 / 3)  # 8/9 < 0.9
    assert s["y"]["p95"] == pytest.approx(100 / 3)
    assert s["z"]["p90"] == pytest.approx(100 / 3)
    assert s["x"]["mean"] == pytest.approx(80.0)
    assert "| x |" in summary_markdown(summarize(acc))
    with pytest.raises(ValueError, match="methods"):
        summarize({"a": {"x": 1.0}, "b": {"y": 1.0}})


def test_unknown_dataset_is_a_clear_error(tmp_path, capsys):
    from ntkit.experiments.uci import main

    with pytest.raises(ValueError, match=r"\['nosuch'\] not found under .*available.*iris.*--list"):
        run_uci(DATA, tmp_path / "out", methods={"rbf": default_methods()["rbf"]}, progress=False,
                datasets=["iris", "nosuch"])
    assert not (tmp_path / "out" / "iris.json").exists()  # checked before any work
    with pytest.raises(SystemExit) as ex:  # the CLI: a usage error (exit 2), not a traceback
        main(["--data", str(DATA), "--out", str(tmp_path / "cli"), "--datasets", "nosuch", "--no-progress"])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "not found under" in err and "--list" in err and "Traceback" not in err
    assert main(["--data", str(DATA), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["hepatitis", "iris", "zoo"]


def test_cli_help_is_complete(capsys):
    from ntkit.experiments.uci import main

    with pytest.raises(SystemExit) as ex:
        main(["--help"])
    assert ex.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse re-wraps lines
    assert "infinitely wide deep nets on small-data tasks" in out  # the full title, not cut mid-sentence
    options = out.split("options:", 1)[1]  # after the usage line
    methods_help = options.split("--methods METHODS", 1)[1].split("--datasets", 1)[0]
    assert all(m in methods_help for m in ("ntk", "laplace", "gamma_exp", "rbf", "rf", "mlp"))


def _regenerate() -> None:  # pragma: no cover - maintenance helper
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run_uci(DATA, tmp, methods=ci_methods(), progress=False)
        acc, val = {}, {}
        for name in list_uci_datasets(DATA):
            res = json.loads((Path(tmp) / f"{name}.json").read_text())["methods"]
            acc[name] = {m: res[m]["test_acc"] for m in METHODS}
            val[name] = {m: res[m]["val_acc"] for m in METHODS}
    EXPECTED.write_text(json.dumps({"methods": list(METHODS), "rf_trees": 50, "accuracy": acc, "val_acc": val},
                                   indent=1) + "\n")
    print(EXPECTED.read_text())


if __name__ == "__main__":  # pragma: no cover
    if "--regenerate" in sys.argv:
        _regenerate()
