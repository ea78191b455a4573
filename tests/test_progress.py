"""Progress bars on long loops: drawn on a terminal, silent in pipes and logs, off with progress=False."""

import io
from pathlib import Path

import pytest

from ntkit._progress import progress, progress_enabled

DATA = Path(__file__).resolve().parent / "data" / "uci"


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_only_on_a_terminal():
    assert not progress_enabled(None, io.StringIO()) and not progress_enabled(True, io.StringIO())
    assert progress_enabled(None, _Tty()) and not progress_enabled(False, _Tty())
    assert list(progress(range(3), enabled=False)) == [0, 1, 2]


@pytest.mark.parametrize("tty", [True, False])
def test_uci_loop_reports_each_data_set(tmp_path, monkeypatch, tty):
    pytest.importorskip("sklearn")
    from ntkit.experiments.uci import default_methods, run_uci

    err = _Tty() if tty else io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    methods = {"rbf": default_methods(C_grid=(1.0,))["rbf"]}
    run_uci(DATA, tmp_path, methods=methods, datasets=["iris", "zoo"], progress=True)
    text = err.getvalue()
    if tty:
        assert "UCI data sets" in text and "/2 " in text and "iris" in text  # one step per data set, labelled
    else:
        assert text == ""  # a pipe or a log file gets no bar


def test_demo_stages_report_progress_on_a_terminal(monkeypatch):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from ntkit.experiments.demo import DemoConfig, build_demo_report

    err = _Tty()
    monkeypatch.setattr("sys.stderr", err)
    cfg = DemoConfig(n_train=30, n_test=30, n_probe=8, kernel_widths=(16, 32), kernel_seeds=2, train_widths=(16,),
                     steps=3, ensemble_width=16, ensemble_size=2, quick=True)
    lines = []
    build_demo_report(cfg, log=lines.append)
    text = err.getvalue()
    assert "ntkit demo" in text and "/6 " in text  # the stages
    assert "training widths" in text and "ensemble of 2" in text  # the training sweeps
    assert len(lines) == 6 and lines[-1].split("] ")[1].startswith("5 ensembles")
