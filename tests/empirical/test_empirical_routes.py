"""Per-layer routes of the structured empirical NTK: the position-pair contraction and the per-layer Jacobian
(per-sample weight gradients from the captured inputs and cotangents), chosen per layer by a multiply-add
model; symmetric blocks computed above the diagonal only; token-match embeddings. Each route, forced on every
layer, agrees with brute-force autograd in float64 (all output forms, x2 given or not, blocks smaller than n),
and ``auto`` takes both routes where a model has both kinds of layer."""

import contextlib

import pytest
import torch
from torch import nn

from ntkit.empirical import _ntk, _rules, empirical_ntk

from test_empirical_models import ZOO, brute_force_ntk

pytestmark = pytest.mark.usefixtures("single_thread")
OUTPUTS = ("full", "trace", "diagonal")


def routes_model():
    """A small ResNet-like stack: a wide-field stem over 64 positions with few channels (the per-layer Jacobian
    is cheaper), then a convolution over 4 positions with many channels (position pairs are cheaper), a Linear
    head on one position."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 40, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(40 * 4, 3)).double().eval()


@contextlib.contextmanager
def route_log():
    _ntk._ROUTE_LOG = log = []
    try:
        yield log
    finally:
        _ntk._ROUTE_LOG = None


def _reduce(full, output):
    if output == "full":
        return full
    diag = torch.diagonal(full, dim1=2, dim2=3)
    return diag if output == "diagonal" else diag.mean(-1)


CASES = {}


def _case(name):
    if name not in CASES:
        if name == "routes":
            model = routes_model()
            g = torch.Generator().manual_seed(4)
            x1 = torch.randn(7, 2, 8, 8, generator=g, dtype=torch.float64)
            x2 = torch.randn(4, 2, 8, 8, generator=g, dtype=torch.float64)
        else:
            model, x, _ = ZOO[name]
            x1, x2 = x, x[1:4]
        CASES[name] = (model, x1, x2, brute_force_ntk(model, x1, x1), brute_force_ntk(model, x1, x2))
    return CASES[name]


@pytest.mark.parametrize("route", ["positions", "jacobian"])
@pytest.mark.parametrize("name", ["routes", "transformer_seq_first", "resnet_batchnorm_eval"])
def test_each_route_matches_brute_force(monkeypatch, route, name):
    """Every weight-sharing layer forced onto one route: the kernel equals brute-force autograd (float64) for
    every output form, x2 = None (symmetric blocks) and x2 given, one block and blocks smaller than n, and row
    chunks of the position route / per-layer Jacobian slices far smaller than a block (the chunk forced tiny:
    one channel and a few input features at a time, or a few channels)."""
    model, x1, x2, ref11, ref12 = _case(name)
    monkeypatch.setattr(_rules, "dense_route", lambda *a, **kw: route)
    for grad_chunk in (None, 50, 4000):
        monkeypatch.setattr(_ntk, "_GRAD_CHUNK", grad_chunk)
        for output in OUTPUTS:
            for bs in (None, 3):
                with route_log() as log:
                    got = empirical_ntk(model, x1, output=output, implementation="structured", batch_size=bs)
                assert log and all(set(block.values()) <= {route, "one-position"} for block in log)
                want = _reduce(ref11, output)
                assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max()), (output, bs)
                mirror = got.transpose(0, 1) if output != "full" else got.permute(1, 0, 3, 2)
                assert float((got - mirror).abs().max()) <= 1e-12 * float(want.abs().max())
            got = empirical_ntk(model, x1, x2, output=output, implementation="structured", batch_size=3)
            want = _reduce(ref12, output)
            assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max()), output


def test_auto_chooses_the_route_per_layer():
    """In the same model the many-position narrow stem takes the per-layer Jacobian and the few-position wide
    convolution the position pairs -- as the multiply-add model says for these shapes -- and the result equals
    brute force."""
    model, x1, _, ref11, _ = _case("routes")
    for output in OUTPUTS:
        with route_log() as log:
            got = empirical_ntk(model, x1, output=output)
        assert log
        for block in log:
            assert block == {"0.weight": "jacobian", "3.weight": "positions", "6.weight": "one-position"}, (output, block)
        want = _reduce(ref11, output)
        assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max())
    n, k = x1.shape[0], 3
    for output in OUTPUTS:
        # stem: 64 positions, patches of 2 * 9, 3 channels; second conv: 4 positions, patches 3 * 9, 40 channels
        stem = {r: _rules.dense_cost(r, n, n, k, k, 64, 64, 18, 3, output, True) for r in ("positions", "jacobian")}
        wide = {r: _rules.dense_cost(r, n, n, k, k, 4, 4, 27, 40, output, True) for r in ("positions", "jacobian")}
        assert stem["jacobian"] < stem["positions"] and wide["positions"] < wide["jacobian"], output


def test_symmetric_contraction_and_block_mirroring():
    """contract_sym computes the chunks on and above the diagonal and mirrors: equal to the full product (all
    output forms, sizes that do and do not divide into chunks)."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 16, 23, 50):
        u = torch.randn(n, 4, 9, generator=g, dtype=torch.float64)
        for output in OUTPUTS:
            want = _rules.contract(u, u, output)
            got = _rules.contract_sym(u, output)
            assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max()), (n, output)


def test_embedding_token_matches_many_repeats():
    """The embedding term from the list of matching (sample, position) pairs, with a tiny vocabulary (almost all
    pairs match, repeated tokens inside a sample) and a padding index, x2 given and not, blocks: brute force."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(3, 4, padding_idx=1), nn.Flatten(), nn.Tanh(), nn.Linear(4 * 6, 2)).double()
    g = torch.Generator().manual_seed(5)
    ids1 = torch.randint(0, 3, (6, 6), generator=g)
    ids2 = torch.randint(0, 3, (4, 6), generator=g)
    for x2 in (None, ids2):
        ref = brute_force_ntk(model, ids1, ids1 if x2 is None else x2)
        for output in OUTPUTS:
            with route_log():
                got = empirical_ntk(model, ids1, x2, output=output, implementation="structured", batch_size=4)
            want = _reduce(ref, output)
            assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max()), output


@pytest.mark.parametrize("name", ["routes", "transformer_batch_first", "embedding_mean_pool"])
def test_passes_in_sub_batches(monkeypatch, name):
    """A block's forward/backward passes run in sub-batches (forced to 2 samples, blocks of 3 and of all n):
    the concatenated features give the brute-force kernel, and nothing falls back to the Jacobian method."""
    if name == "routes":
        model, x1, x2, ref11, ref12 = _case("routes")
    else:
        model, x1, _ = ZOO[name]
        x2 = x1[1:4]
        ref11, ref12 = brute_force_ntk(model, x1, x1), brute_force_ntk(model, x1, x2)
    monkeypatch.setattr(_ntk, "_PASS_BATCH", 2)
    for output in OUTPUTS:
        for bs in (None, 3):
            _ntk._METHOD_LOG = log = []
            try:
                got = empirical_ntk(model, x1, output=output, implementation="structured", batch_size=bs)
            finally:
                _ntk._METHOD_LOG = None
            assert log and all(v != "jacobian" for block in log for v in block.values())
            want = _reduce(ref11, output)
            assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max()), (output, bs)
        got = empirical_ntk(model, x1, x2, output=output, implementation="structured", batch_size=3)
        want = _reduce(ref12, output)
        assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max()), output


def test_route_chunk_is_sized_from_the_budget(monkeypatch):
    """The weight-sharing routes' chunk comes from the memory budget: the blocks are planned with the default
    chunk (made tiny here), then the chunk grows as far as the budget allows -- up to what the routes can use
    under a large budget, to the largest doubling whose estimate fits under a smaller one -- and the kernel is the
    brute-force one whatever the chunk."""
    model, x1, _, ref11, _ = _case("routes")
    monkeypatch.setattr(_ntk, "GRAD_CHUNK", 64)
    monkeypatch.setattr(_ntk, "MIN_CHUNK", 8)
    seen, calls = [], []
    orig, orig_est = _ntk.pair_term, _ntk.peak_memory_estimate

    def spy(*args, **kw):
        seen.append(args[7] if len(args) > 7 else kw.get("chunk"))
        return orig(*args, **kw)

    def spy_est(*args, **kw):
        calls.append((args, kw))
        return orig_est(*args, **kw)

    monkeypatch.setattr(_ntk, "pair_term", spy)
    monkeypatch.setattr(_ntk, "peak_memory_estimate", spy_est)

    def run(budget):
        seen.clear()
        calls.clear()
        got = empirical_ntk(model, x1, output="full", implementation="structured", memory_budget=budget)
        assert float((got - ref11).abs().max()) <= 1e-10 * float(ref11.abs().max()), budget
        assert len(set(seen)) == 1
        args, kw = calls[-1]  # the final block's estimate, at the chosen chunk
        assert kw["chunk"] == seen[0]
        return seen[0], args, kw, got.numel() * got.element_size()

    big, args, kw, result = run(1e10)
    assert big > 64
    at = {ch: orig_est(*args, **{**kw, "chunk": ch}) for ch in (big // 4, big // 2, big, 2 * big)}
    assert at[2 * big] == at[big] > at[big // 2]  # grown exactly until the routes could use no more
    budget = result + at[big // 4] + 1  # room for a quarter of it
    small, args, kw, result = run(budget)
    assert big // 4 <= small < big
    assert orig_est(*args, **kw) + result <= budget < orig_est(*args, **{**kw, "chunk": 2 * small}) + result


def test_outputs_that_reach_only_some_layers():
    """Each of the k + 1 backward passes reaches only the layers its output depends on (two heads on separate
    branches, a layer no output uses): the missing cotangents are zeros and the kernel is the brute-force one."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(5, 3), nn.Linear(5, 2), nn.Linear(5, 2)

        def forward(self, x):
            self.unused(x).detach()
            return torch.cat([torch.tanh(self.a(x)), self.b(x).sin()], dim=1)

    torch.manual_seed(0)
    model = TwoHeads().double()
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = [nm for nm, _ in model.named_parameters() if not nm.startswith("unused")]
    ref = brute_force_ntk(model, x, x)
    for output in OUTPUTS:
        _ntk._METHOD_LOG = log = []
        try:
            got = empirical_ntk(model, x, output=output, implementation="structured", params=params)
        finally:
            _ntk._METHOD_LOG = None
        assert log and all(v.startswith("structured") for block in log for v in block.values()), log
        want = _reduce(ref, output)
        assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max()), output
