"""The full-rank kernels' fit (fit_full.py): hand-made gradients, exact polish, what it reaches."""

import pytest
import torch

from dynconvert.dynamics import DynSpec, materialize, relations
from dynconvert.fit import fit_weight, solve_coupling, svd_rel_error
from dynconvert.fit_full import block_step, exact_coupling, exact_error


@pytest.mark.parametrize("metric", ["l1", "l2", "sql2"])
@pytest.mark.parametrize("kernel", ["linear", "inverse"])
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
    import dynconvert.fit_full as ff

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
    import dynconvert.fit_full as ff

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
