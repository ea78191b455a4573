"""The public namespace: every name in ntkit.__all__ resolves, and importing ntkit stays light."""

import subprocess
import sys

import ntkit


def test_all_names_resolve():
    for name in ntkit.__all__:
        assert getattr(ntkit, name) is not None, name
    assert set(ntkit.__all__) <= set(dir(ntkit))


def test_import_does_not_load_optional_dependencies():
    code = "import sys, ntkit; print(int('sklearn' in sys.modules), int('matplotlib' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0"]
