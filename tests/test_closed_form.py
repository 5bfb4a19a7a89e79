"""The fit's closed-form pieces, against brute force: couplings for fixed states, and the sql2 SVD start."""

import pytest
import torch

from dynconvert.dynamics.modules import DynSpec, materialize, relations
from dynconvert.dynamics.fit import rel_error, solve_coupling, svd_rel_error
from dynconvert.dynamics.fit_sql2 import Sql2Error, Target, solve_coupling_sql2, sql2_svd_init


@pytest.mark.parametrize("m,n,h,d", [(7, 5, 3, 2), (12, 20, 4, 4)])
def test_sql2_couplings_match_the_least_squares_solution_on_built_relations(m, n, h, d):
    g = torch.Generator().manual_seed(m * n)
    x, y, w = torch.randn(h, m, d, generator=g), torch.randn(h, n, d, generator=g), torch.randn(m, n, generator=g)
    want_c, want_o = solve_coupling(relations(x, y, "sql2", "linear"), w)
    got_c, got_o = solve_coupling_sql2(x, y, w)
    torch.testing.assert_close(got_c, want_c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_o, want_o, rtol=1e-4, atol=1e-5)


def test_couplings_are_optimal_for_their_states():
    g = torch.Generator().manual_seed(1)
    x, y, w = torch.randn(3, 9, 2, generator=g), torch.randn(3, 6, 2, generator=g), torch.randn(9, 6, generator=g)
    rel = relations(x, y, "l1", "linear")
    c, o = solve_coupling(rel, w)
    best = rel_error(w, materialize(x, y, c, o, "l1", "linear"))
    for _ in range(20):  # any perturbation of the least-squares solution fits worse
        dc = 1e-2 * torch.randn(3, generator=g)
        assert rel_error(w, materialize(x, y, c + dc, o, "l1", "linear")) >= best - 1e-7


@pytest.mark.parametrize("h,d", [(2, 4), (4, 4), (3, 2)])
def test_sql2_svd_start_reproduces_the_truncated_svd_two_ranks_down(h, d):
    g = torch.Generator().manual_seed(h * d)
    w = torch.randn(24, 16, generator=g) + 0.3
    x, y = sql2_svd_init(w, DynSpec(h, d, "sql2", "linear"))
    c, o = solve_coupling_sql2(x, y, w)
    centred = svd_rel_error(w - w.mean(), h * d - 2) * float((w - w.mean()).norm() / w.norm())
    assert rel_error(w, materialize(x, y, c, o, "sql2", "linear")) <= centred + 1e-4


def test_sql2_svd_start_needs_three_coordinates():
    assert sql2_svd_init(torch.randn(4, 4), DynSpec(1, 2, "sql2", "linear")) is None


@pytest.mark.parametrize("m,n,h,d", [(9, 7, 3, 2), (16, 24, 4, 3)])
def test_sql2_error_and_stress_forces_match_autograd_through_the_built_matrix(m, n, h, d):
    """The hand-made sql2 step (fit_sql2.Sql2Error) gives the error and the state gradients that
    autograd gives through W_hat, with the couplings held at their optimum (variable projection)."""
    g = torch.Generator().manual_seed(m + n)
    x, y, w = (torch.randn(h, m, d, generator=g, dtype=torch.float64), torch.randn(h, n, d, generator=g, dtype=torch.float64),
               torch.randn(m, n, generator=g, dtype=torch.float64))
    w_sq = w.pow(2).sum()
    c, o = solve_coupling_sql2(x, y, w)
    xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
    want = (materialize(xa, ya, c, o, "sql2", "linear") - w).pow(2).sum() / w_sq
    want.backward()
    xb, yb = x.clone().requires_grad_(), y.clone().requires_grad_()
    got = Sql2Error.apply(xb, yb, Target(w))
    got.backward()
    torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(yb.grad, ya.grad, rtol=1e-7, atol=1e-10)
