"""The empirical NTK of real models: token ids, dict inputs with attention masks, transformer encoders
(batch first and not), ResNet blocks with BatchNorm (eval and train mode) and GroupNorm -- every
implementation and output form against brute-force autograd in float64, with blocks smaller than n; the
structured rules (Embedding, norm affine parameters, attention projections) are actually taken."""

import contextlib
import sys

import pytest
import torch
from torch import nn

from ntkit.empirical import _ntk, empirical_nngp, empirical_ntk

IMPLS = ("jacobian", "ntk_vector", "structured", "auto")
pytestmark = pytest.mark.usefixtures("single_thread")


def _run(model, x, kwargs=None):
    kwargs = kwargs or {}
    if isinstance(x, dict):
        return model(**x, **kwargs)
    if isinstance(x, tuple):
        return model(*x, **kwargs)
    return model(x, **kwargs)


def _rows(x, sl):
    if isinstance(x, dict):
        return {k: v[sl] for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(v[sl] for v in x)
    return x[sl]


def brute_force_ntk(model, x1, x2, per_sample=True):
    """Theta_ab(x, x') = sum_p df_a(x)/dp df_b(x')/dp by one autograd.grad per sample and output; each
    sample alone (per_sample) or differentiating the whole batch's output (batch-coupled models)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def jac(x):
        n = next(iter(x.values())).shape[0] if isinstance(x, dict) else (x[0] if isinstance(x, tuple) else x).shape[0]
        rows = []
        for i in range(n):
            out = _run(model, _rows(x, slice(i, i + 1)) if per_sample else x).reshape(1 if per_sample else n, -1)
            row = out[0 if per_sample else i]
            rows.append(torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                                for g, p in zip(torch.autograd.grad(row[a], params, retain_graph=True,
                                                                                    allow_unused=True), params)])
                                     for a in range(row.shape[0])]))
        return torch.stack(rows)

    return torch.einsum("iap,jbp->ijab", jac(x1), jac(x2))


class EmbedPool(nn.Module):
    """Token ids -> embedding (padding row 0) -> mean over tokens -> Linear."""

    def __init__(self, vocab=12, dim=6, out=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, out)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids).mean(1)))


class MaskedEncoder(nn.Module):
    """Keyword inputs input_ids and attention_mask: embedding, LayerNorm, masked mean, Linear."""

    def __init__(self, vocab=10, dim=6, out=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out)

    def forward(self, input_ids, attention_mask):
        h = self.norm(self.emb(input_ids))
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        return self.head(torch.tanh((h * m).sum(1) / m.sum(1).clamp_min(1.0)))


class TinyTransformer(nn.Module):
    def __init__(self, batch_first=True, vocab=11, dim=8, out=2):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 12, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, out)

    def forward(self, ids, pad_mask=None):
        h = self.emb(ids)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.enc(h, src_key_padding_mask=pad_mask)
        return self.head(h.mean(1 if self.batch_first else 0))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, c=3, out=2):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(2, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.block = Block(c)
        self.head = nn.Linear(c, out)

    def forward(self, x):
        h = self.block(torch.relu(self.bn(self.stem(x))))
        return self.head(h.mean((2, 3)))


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)


def _zoo():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 12, (7, 5), generator=g)
    ids[0, :2] = 0  # padding tokens
    ids[1] = ids[2]  # repeated tokens across samples
    emb = EmbedPool().double()
    masked = MaskedEncoder().double()
    ids2 = torch.randint(0, 10, (6, 4), generator=g)
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[0, 2:] = False
    mask[3, 1:] = False
    x_dict = {"input_ids": ids2, "attention_mask": mask}
    tf_first = TinyTransformer(True).double().eval()
    tf_seq = TinyTransformer(False).double().eval()
    ids3 = torch.randint(0, 11, (5, 4), generator=g)
    res = TinyResNet().double()
    _randomise_bn(res)
    x_img = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    gn = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                       nn.Linear(4 * 16, 2)).double()
    with torch.no_grad():
        gn[1].weight.uniform_(0.5, 1.5)
        gn[1].bias.uniform_(-0.3, 0.3)
    return {
        "embedding_mean_pool": (emb, ids, {}),
        "dict_attention_mask": (masked, x_dict, {}),
        "transformer_batch_first": (tf_first, ids3, {}),
        "transformer_seq_first": (tf_seq, ids3, {}),
        "resnet_batchnorm_eval": (res.eval(), x_img, {}),
        "groupnorm": (gn, x_img, {}),
    }


ZOO = _zoo()


@contextlib.contextmanager
def method_log():
    _ntk._METHOD_LOG = log = []
    try:
        yield log
    finally:
        _ntk._METHOD_LOG = None


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("impl", IMPLS)
def test_models_match_brute_force(name, impl):
    model, x, _ = ZOO[name]
    n = next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]
    x1, x2 = _rows(x, slice(0, n - 2)), _rows(x, slice(n - 2, n))
    ref = brute_force_ntk(model, x1, x2)
    ref11 = brute_force_ntk(model, x1, x1)
    tol = 1e-10 * float(ref11.abs().max())
    if impl == "ntk_vector" and name.startswith("transformer"):
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            empirical_ntk(model, x1, x2, implementation=impl, batch_size=2)
        return
    for output in ("full", "diagonal", "trace"):
        want = ref if output == "full" else torch.diagonal(ref, dim1=2, dim2=3)
        want = want.mean(-1) if output == "trace" else want
        got = empirical_ntk(model, x1, x2, output=output, implementation=impl, batch_size=2)
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= tol, output
    # symmetric call with blocks over samples and over output units
    got = empirical_ntk(model, x1, output="full", implementation=impl, batch_size=2, output_batch_size=1)
    assert float((got - ref11).abs().max()) <= tol


def test_structured_rules_are_taken():
    """Embedding, LayerNorm/BatchNorm/GroupNorm affine parameters and attention projections go through their
    structured rules (not the Jacobian fallback) in these models."""
    expect = {
        "embedding_mean_pool": {"emb.weight": "embedding", "head.weight": "linear/conv"},
        "dict_attention_mask": {"emb.weight": "embedding", "norm.weight": "norm", "norm.bias": "norm"},
        "transformer_batch_first": {"emb.weight": "embedding",
                                    "enc.layers.0.self_attn.in_proj_weight": "linear/conv",
                                    "enc.layers.0.self_attn.in_proj_bias": "linear/conv",
                                    "enc.layers.0.self_attn.out_proj.weight": "linear/conv",
                                    "enc.layers.0.self_attn.out_proj.bias": "linear/conv",
                                    "enc.layers.0.norm1.weight": "norm", "enc.layers.0.linear2.weight": "linear/conv"},
        "transformer_seq_first": {"emb.weight": "embedding", "enc.layers.0.self_attn.in_proj_weight": "linear/conv",
                                  "enc.layers.0.self_attn.out_proj.weight": "linear/conv",
                                  "enc.layers.0.norm2.bias": "norm", "enc.layers.0.linear1.weight": "linear/conv"},
        "resnet_batchnorm_eval": {"bn.weight": "norm", "block.b2.bias": "norm", "stem.weight": "linear/conv"},
        "groupnorm": {"1.weight": "norm", "1.bias": "norm"},
    }
    for name, want in expect.items():
        model, x, _ = ZOO[name]
        with method_log() as log:
            empirical_ntk(model, x, implementation="structured", batch_size=3)
        assert log, name
        names = [k for k, v in model.named_parameters() if v.requires_grad]
        for block in log:
            assert all(block[nm] != "jacobian" for nm in names), (name, block)  # nothing falls back
            for nm, rule in want.items():
                assert block[nm] == "structured:" + rule, (name, nm, block[nm])
        # auto picks the structured path for these models
        with method_log() as log:
            empirical_ntk(model, x, implementation="auto")
        assert log, name


def test_train_mode_batchnorm_resnet_is_exact_whole_batch():
    model = TinyResNet().double().train()
    _randomise_bn(model)
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    x2 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = brute_force_ntk(model, x1, x2, per_sample=False)
    ref11 = brute_force_ntk(model, x1, x1, per_sample=False)
    model.load_state_dict(before)  # the reference's forwards updated the running statistics
    for impl in ("auto", "jacobian", "ntk_vector"):
        for output in ("full", "diagonal", "trace"):
            got = empirical_ntk(model, x1, x2, output=output, implementation=impl, batch_size=2)
            want = ref if output == "full" else torch.diagonal(ref, dim1=2, dim2=3)
            want = want.mean(-1) if output == "trace" else want
            assert float((got - want).abs().max()) <= 1e-10 * float(ref.abs().max()), (impl, output)
        got = empirical_ntk(model, x1, output="full", implementation=impl, output_batch_size=1)
        assert float((got - ref11).abs().max()) <= 1e-10 * float(ref11.abs().max()), impl
    with pytest.raises(ValueError, match="train-mode BatchNorm"):
        empirical_ntk(model, x1, implementation="structured")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training


class Positional(nn.Module):
    """Tuple input (ids, shift) with the batch of `shift` on axis 1, plus a static mask (batch_dim None)."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(9, 4), nn.Linear(4, 2)

    def forward(self, ids, shift, scale):
        return self.head(torch.tanh(self.emb(ids).mean(1) * scale + shift.transpose(0, 1).sum(1, keepdim=True)))


def test_inputs_structures_batch_dim_and_validation():
    torch.manual_seed(3)
    model = Positional().double()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 9, (5, 3), generator=g)
    shift = torch.randn(2, 5, generator=g, dtype=torch.float64)  # batch on axis 1
    scale = torch.tensor(0.7, dtype=torch.float64)  # not batched
    x = (ids, shift, scale)
    bd = (0, 1, None)
    got = empirical_ntk(model, x, output="full", batch_dim=bd, batch_size=2)
    # reference: the same model with the batch of `shift` moved to axis 0 by a wrapper

    class Wrapped(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, shift_t):
            return self.m(ids, shift_t.T, scale)

    ref = brute_force_ntk(Wrapped(model), (ids, shift.T.contiguous()), (ids, shift.T.contiguous()))
    assert float((got - ref).abs().max()) <= 1e-10 * float(ref.abs().max())
    # nngp accepts the same inputs
    f = model(ids, shift, scale)
    torch.testing.assert_close(empirical_nngp(model, x, batch_dim=bd), f @ f.T / 2)
    # validation: structure, trailing shapes, batch lengths, NaN rows in floating leaves
    with pytest.raises(ValueError, match="batch_dim has 3 entries but x2 has 2"):
        empirical_ntk(model, x, (ids, shift), batch_dim=bd)
    with pytest.raises(ValueError, match="different structures"):
        empirical_ntk(EmbedPool().double(), (ids,), {"ids": ids})
    with pytest.raises(ValueError, match="must match"):
        empirical_ntk(model, x, (ids[:, :2], shift, scale), batch_dim=bd)
    with pytest.raises(ValueError, match="different batch lengths"):
        empirical_ntk(model, (ids[:4], shift, scale), batch_dim=bd)
    bad = shift.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="row 3 contains NaN"):
        empirical_ntk(model, (ids, bad, scale), batch_dim=bd)
    with pytest.raises(TypeError, match="dtypes"):
        empirical_ntk(EmbedPool().double(), ids, ids.double())


_MEMORY_SCRIPT = r'''
import gc, json, os, sys, threading, time
import torch
from torch import nn
import ntkit.empirical._ntk as E
from ntkit.empirical import empirical_ntk
torch.manual_seed(0)
torch.set_num_threads(1)
kind, budget = sys.argv[1], float(sys.argv[2])
if kind == "cnn":
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 8 * 8, 20)).eval()
    x = torch.randn(40, 3, 16, 16)
elif kind == "routes":  # a many-position stem (per-layer Jacobian route), a few-position wide conv (positions)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                          nn.MaxPool2d(4), nn.Conv2d(16, 128, 3, stride=4, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(128 * 4, 20)).eval()
    x = torch.randn(48, 3, 32, 32)
    E._ROUTE_LOG = routes = []
else:
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(500, 64)
            layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(64, 20)

        def forward(self, ids):
            return self.head(self.enc(self.emb(ids)).mean(1))
    model = Enc().eval()
    x = torch.randint(0, 500, (24, 32))
seen = []
orig = E.peak_memory_estimate
E.peak_memory_estimate = lambda *a, **kw: seen.append(orig(*a, **kw)) or seen[-1]
empirical_ntk(model, x[:2], output="full")  # warm-up: allocator, lazy imports
if kind == "routes":
    routes.clear()
seen.clear()
gc.collect()
page = os.sysconf("SC_PAGE_SIZE")
def rss():  # current resident set (the high-water mark ru_maxrss would include the warm-up and imports)
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * page
base, top, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        top[0] = max(top[0], rss())
        time.sleep(0.0005)
t = threading.Thread(target=sample, daemon=True)
t.start()
out = empirical_ntk(model, x, output="full", memory_budget=budget,
                   implementation="structured" if kind == "routes" else "auto")
done.set()
t.join()
peak = max(top[0], rss()) - base
if kind == "routes":
    assert {r for block in routes for r in block.values()} >= {"jacobian", "positions"}, routes
print(json.dumps({"peak": peak, "estimate": seen[-1] + out.numel() * 4}))
'''


@pytest.mark.parametrize("kind,budget", [("cnn", 4e9), ("routes", 4e9), ("routes", 3e8),
                                         pytest.param("transformer", 6e7, marks=pytest.mark.slow)])
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_peak_memory_estimate_is_truthful(kind, budget):
    """The measured peak (growth of the resident set over the call, sampled every 0.5 ms, in a fresh process) of a full k = 20
    kernel -- all samples in one block, or blocked over samples and outputs under a small budget -- exceeds
    the estimate ntkit budgets with by at most 1.5x (and is at least a third of it)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, kind, str(budget)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = res["peak"] / res["estimate"]
    # the peak resident set is noisy (allocator reuse, +-30% between identical runs here): the estimate must
    # not be exceeded by more than 1.5x, and must not be a gross overestimate either
    assert 1 / 3 <= ratio <= 1.5, res
    assert res["peak"] <= 1.5 * budget


def test_per_sample_gradient_chunks_and_many_outputs(monkeypatch):
    """Per-layer Jacobian rows formed in slices of the weight (chunk forced tiny) give the same kernel; k = 30
    outputs blocked over outputs under a budget equal the unblocked result."""
    model, x, _ = ZOO["transformer_batch_first"]
    ref = empirical_ntk(model, x, output="full", implementation="structured")
    monkeypatch.setattr(_ntk, "_GRAD_CHUNK", 64)
    got = empirical_ntk(model, x, output="full", implementation="structured", batch_size=3)
    assert float((got - ref).abs().max()) <= 1e-10 * float(ref.abs().max())
    monkeypatch.undo()
    torch.manual_seed(1)
    wide = nn.Sequential(nn.Embedding(11, 8), nn.Flatten(), nn.Linear(8 * 4, 30)).double()
    ids = torch.randint(0, 11, (6, 4), generator=torch.Generator().manual_seed(3))
    full = empirical_ntk(wide, ids, output="full")
    for out_bs in (7, 30):
        blocked = empirical_ntk(wide, ids, output="full", output_batch_size=out_bs, batch_size=4)
        assert float((blocked - full).abs().max()) <= 1e-12 * float(full.abs().max())
        tr = empirical_ntk(wide, ids, output="trace", output_batch_size=out_bs, batch_size=4)
        torch.testing.assert_close(tr, torch.diagonal(full, dim1=2, dim2=3).mean(-1), rtol=1e-12, atol=0)
    ref = brute_force_ntk(wide, ids, ids)
    assert float((full - ref).abs().max()) <= 1e-10 * float(ref.abs().max())
