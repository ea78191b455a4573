"""A store_kernel process killed with SIGKILL mid-way resumes to the bits of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zarr

import ntkit
from ntkit.store import MANIFEST_NAME, store_kernel
from instrumented_kernel import Instrumented

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
import numpy as np, torch, ntkit
from ntkit.store import store_kernel
from instrumented_kernel import Instrumented

x = torch.from_numpy(np.load(sys.argv[1]))
k = Instrumented(ntkit.mlp(depth=3, b_std=0.1).kernel_fn("ntk"), delay=0.15)  # slowed down, to be killed mid-way
store_kernel(k, x, path=sys.argv[2], tile_size=40, dtype=torch.float32, progress=False)
"""


def _completed(path):
    try:
        return json.loads((path / MANIFEST_NAME).read_text())["completed"]
    except (OSError, ValueError, KeyError):
        return []


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    x = np.random.default_rng(1).standard_normal((320, 20))  # 8 x 8 grid of 40-row tiles: 36 tiles
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "run.py").write_text(SCRIPT)
    path = tmp_path / "store"
    pythonpath = [str(ROOT), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    cmd = [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "x.npy"), str(path)]

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(_completed(path)) < 5:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    # the half-written store says so: incomplete manifest and attributes, NaN where tiles are missing
    done = len(_completed(path))
    assert 5 <= done < 36
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["complete"] is False
    half = zarr.open_array(str(path), mode="r")
    assert half.attrs["ntkit"]["complete"] is False and np.isnan(half[:]).any()

    # restart (here, in this process: same kernel, same arguments)
    kernel = Instrumented(ntkit.mlp(depth=3, b_std=0.1).kernel_fn("ntk"))
    resumed = store_kernel(kernel, torch.from_numpy(x), path=path, tile_size=40, dtype=torch.float32, progress=False)
    assert kernel.calls == 36 - done  # only the missing tiles were computed
    assert resumed.attrs["ntkit"]["complete"] is True
    ref = store_kernel(ntkit.mlp(depth=3, b_std=0.1).kernel_fn("ntk"), x, path=tmp_path / "ref", tile_size=40,
                       dtype=torch.float32)
    assert np.array_equal(resumed[:].view(np.uint32), ref[:].view(np.uint32))
