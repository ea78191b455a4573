"""Every neural-tangents reference case (fully-connected, convolutional, pooling, residual, layer norm),
reproduced through ntkit.from_config.

The reference values (neural-tangents 0.6.5, float64) are an independent implementation; the
tolerance max|a - b| <= 1e-6 max|b| is the one its README recommends (its own rounding at
correlations of exactly +-1 is ~1e-8).
"""

import json

import numpy as np
import pytest

import ntkit
from conftest import load_reference, reference_cases

CASES = reference_cases()


def test_all_cases_are_present():
    # the whole reference set: 100 fully-connected cases, 6 convolutional ones (conv, strides, VALID/SAME,
    # global average pooling, flatten), 3 residual (1 conv) and 3 layer-norm (1 conv) cases
    assert len(CASES) == 112


@pytest.mark.parametrize("name,path", CASES, ids=[c[0] for c in CASES])
def test_reference_case(name, path, single_thread):
    cfg, z = load_reference(path)
    arch = ntkit.from_config(json.dumps(cfg))  # through the JSON string form
    for a, b in (("x1", "x2"), ("x1", "x1"), ("x2", "x2")):
        k = arch.kernel(z[a], None if a == b else z[b], ("nngp", "ntk"))
        for kname in ("nngp", "ntk"):
            ref = z[f"{kname}_{a}_{b}"]
            got = getattr(k, kname).numpy()
            assert got.shape == ref.shape
            err = np.abs(got - ref).max()
            assert err <= 1e-6 * np.abs(ref).max(), f"{name} {kname}({a},{b}): max err {err:.3g}"
