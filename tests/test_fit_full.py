"""The full-rank kernels' fit (fit_full.py): hand-made gradients, exact polish, what it reaches."""

import pytest
import torch

from dynconvert.dynamics.modules import DynSpec, materialize, relations
from dynconvert.dynamics.fit import fit_weight, solve_coupling, svd_rel_error
from dynconvert.dynamics.fit_full import block_step, exact_coupling, exact_error


@pytest.mark.parametrize("metric", ["l1", "l2", "sql2"])
@pytest.mark.parametrize("kernel", ["linear", "inverse", "gauss"])
def test_block_gradient_is_autograds(metric, kernel):
    """With the couplings at their optimum, the hand-made gradient equals autograd's through cdist."""
    gen = torch.Generator().manual_seed(0)
    spec = DynSpec(3, 2, metric, kernel)
    x = torch.rand(3, 7, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.rand(3, 9, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 9, generator=gen, dtype=torch.float64)
    rel = relations(x, y, metric, kernel)
    c, o = solve_coupling(rel.detach(), w)
    loss = (torch.einsum("h,hmn->mn", c, rel) + o - w).pow(2).sum() / w.pow(2).sum()
    loss.backward()
    got, gx, gy = block_step(x.detach(), y.detach(), w, spec)
    assert got == pytest.approx(loss.item(), rel=1e-9)
    torch.testing.assert_close(gx, x.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(gy, y.grad, rtol=1e-7, atol=1e-10)


def test_tiled_polish_is_exact(monkeypatch):
    """Couplings and error accumulated over row tiles equal the whole-tensor ones."""
    import dynconvert.dynamics.fit_full as ff

    monkeypatch.setattr(ff, "TILE_ELEMENTS", 2 * 3 * 40)  # 2 rows per tile: 13 tiles
    gen = torch.Generator().manual_seed(1)
    spec = DynSpec(3, 2, "l2")
    x, y, w = torch.rand(3, 25, 2, generator=gen), torch.rand(3, 40, 2, generator=gen), torch.randn(25, 40, generator=gen)
    c, o = exact_coupling(x, y, w, spec)
    want_c, want_o = solve_coupling(relations(x.double(), y.double(), "l2", "linear"), w.double())
    torch.testing.assert_close(c.double(), want_c, rtol=1e-5, atol=1e-6)
    approx = materialize(x, y, c, o, "l2", "linear")
    assert exact_error(x, y, c, o, w, spec) == pytest.approx(float((approx - w).norm() / w.norm()), rel=1e-5)


@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_row_blocks_fit_like_full_steps(metric, monkeypatch):
    """The large-layer path (a row block per step) descends like full steps at equal passes, the
    error it reports is the states' true error, and a seed gives the same bytes."""
    import dynconvert.dynamics.fit_full as ff

    gen = torch.Generator().manual_seed(2)
    spec = DynSpec(2, 2, metric)
    w = materialize(torch.rand(2, 60, 2, generator=gen), torch.rand(2, 50, 2, generator=gen),
                    torch.tensor([1.0, -0.7]), torch.tensor(0.3), metric, "linear") + 0.1 * torch.randn(60, 50, generator=gen)
    x0, y0 = torch.rand(2, 60, 2, generator=gen), torch.rand(2, 50, 2, generator=gen)
    c0, o0 = exact_coupling(x0, y0, w, spec)
    start = exact_error(x0, y0, c0, o0, w, spec)
    full = ff.fit_full(w, spec, (x0, y0), steps=60, lr=0.05, seed=0)[4]
    monkeypatch.setattr(ff, "STEP_ELEMENTS", 2 * 50 * 15)  # 15-row blocks: 4 per pass
    x, y, c, o, blocks = ff.fit_full(w, spec, (x0, y0), steps=240, lr=0.05, seed=0)
    assert full < 0.7 * start and blocks < 1.1 * full, (start, full, blocks)
    approx = materialize(x, y, c, o, metric, "linear")
    assert blocks == pytest.approx(float((approx - w).norm() / w.norm()), rel=1e-4)
    again = ff.fit_full(w, spec, (x0, y0), steps=240, lr=0.05, seed=0)
    assert torch.equal(again[0], x) and torch.equal(again[2], c)


def test_fit_weight_routes_full_rank_kernels():
    """fit_weight fits l2 with fit_full (no (H, m, n) autograd) and reports its exact error."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(30, 40, generator=gen)
    res = fit_weight(w, DynSpec(2, 3, "l2"), steps=50, seed=0)
    approx = materialize(res.states_out, res.states_in, res.coupling, res.offset, "l2", "linear")
    assert res.rel_error == pytest.approx(float((approx - w).norm() / w.norm()), rel=1e-4) and res.rel_error < 1


def test_registry_answers_what_names_used_to():
    """One table decides: which pairs are thin factors, which have a weight-free path, and a bad
    name is a ValueError naming the choices (the CLI turns it into one error line)."""
    from dynconvert.dynamics import metrics
    assert [(m, k) for m in metrics.METRICS for k in metrics.KERNELS if metrics.low_rank(m, k)] == [("sql2", "linear")]
    assert {(m, k): metrics.weight_free_path(m, k) for m in ("l1", "l2", "sql2") for k in ("linear", "inverse")} == {
        ("l1", "linear"): "l1", ("sql2", "linear"): "sql2", ("l1", "inverse"): None, ("l2", "linear"): None,
        ("l2", "inverse"): None, ("sql2", "inverse"): None}
    with pytest.raises(ValueError, match="unknown metric 'cos'; choose one of l1, l2, sql2"):
        DynSpec(1, 1, "cos")
    with pytest.raises(ValueError, match="unknown kernel 'exp'"):
        relations(torch.zeros(1, 2, 1), torch.zeros(1, 2, 1), "l1", "exp")
    # every registered pair materializes what its distance and phi say
    gen = torch.Generator().manual_seed(4)
    x, y = torch.rand(2, 5, 3, generator=gen, dtype=torch.float64), torch.rand(2, 4, 3, generator=gen, dtype=torch.float64)
    for m in metrics.METRICS:
        p = {"l1": 1, "l2": 2, "sql2": 2}[m]
        dist = (x[:, :, None] - y[:, None]).abs().pow(p).sum(-1)
        dist = dist if m == "sql2" else dist.pow(1 / p)
        for k in metrics.KERNELS:
            phi = {"linear": dist, "inverse": 1 / (dist + metrics.INVERSE_EPS), "gauss": torch.exp(-dist**2)}[k]
            want = torch.einsum("h,hmn->mn", torch.tensor([0.5, -1.0], dtype=torch.float64), phi) + 0.25
            got = materialize(x, y, torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64), m, k)
            torch.testing.assert_close(got, want)


def test_gauss_kernel_starts_near_svd():
    """exp(-t^2) starts from the scaled SVD states (near truncated SVD two ranks down, not a random
    start's error) and the descent improves on that start."""
    torch.manual_seed(0)
    w = torch.randn(40, 6) @ torch.randn(6, 60) + 0.3 * torch.randn(40, 60)
    w = torch.tanh(w)  # a curved, not quite low-rank matrix
    spec = DynSpec(3, 2, "l2", "gauss")
    start = fit_weight(w, spec, steps=0).rel_error
    assert start <= svd_rel_error(w, 4) + 0.05
    assert fit_weight(w, spec, steps=0, init="random").rel_error > start + 0.3
    assert fit_weight(w, spec, steps=300).rel_error < start - 0.1
