"""Groups and tangents: references (finite differences, the published sampler under
autograd), invariants (warp then un-warp) and analytic cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import layerlie as ll
from layerlie.core.tangent import published_sampler_terms
from layerlie.testing import ATOL, rel, smooth_image

SPATIAL = [g for g in ll.list_groups() if ll.group(g).spatial]


# --- analytic -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, published", [
    ("translate_x", lambda t: [[1, 0, t], [0, 1, 0]]),
    ("translate_y", lambda t: [[1, 0, 0], [0, 1, t]]),
    ("rotate", lambda t: [[math.cos(t), math.sin(t), 0], [-math.sin(t), math.cos(t), 0]]),
    ("shear_x", lambda t: [[1, t, 0], [0, 1, 0]]),
    ("shear_y", lambda t: [[1, 0, 0], [t, 1, 0]]),
    ("hyperbolic_rotate", lambda t: [[math.cosh(t), math.sinh(t), 0], [math.sinh(t), math.cosh(t), 0]]),
    ("scale", lambda t: [[1 - t, 0, 0], [0, 1 - t, 0]]),
    ("stretch_x", lambda t: [[1 + t, 0, 0], [0, 1, 0]]),
])
def test_matrix_matches_published_table_to_first_order(name, published):
    """exp(tM) equals the docs/method.md §1 table's finite transform, exactly where that one is a
    group and to first order where it is not (scale, stretch)."""
    for t in (1e-3, 0.3):
        diff = (ll.group(name).matrix(t) - torch.tensor(published(t), dtype=torch.float64)).abs().max()
        assert diff <= (1e-12 if name not in ("scale", "stretch_x") else t * t)


def test_matrix_is_a_one_parameter_group():
    for name in SPATIAL:
        g = ll.group(name).homogeneous()
        a, b = 0.3, -0.7
        ma, mb, mab = (torch.linalg.matrix_exp(s * g) for s in (a, b, a + b))
        assert torch.allclose(ma @ mb, mab, atol=ATOL["graph"])


def test_velocity_is_generator_times_position():
    u = torch.tensor([[0.5, -0.25]], dtype=torch.float64)
    assert ll.group("rotate").velocity(u).tolist() == [[-0.25, -0.5]]
    assert ll.group("translate_y").velocity(u).tolist() == [[0.0, 1.0]]


def test_ramp_tangent_is_velocity_times_slope():
    """h = a u_x + b u_y has G h = a v_x + b v_y exactly in the interior, every scheme but
    spectral (a ramp is not periodic)."""
    h_, w_ = 9, 13
    uy = torch.linspace(-1, 1, h_, dtype=torch.float64)[:, None]
    ux = torch.linspace(-1, 1, w_, dtype=torch.float64)[None, :]
    img = (0.7 * ux - 1.3 * uy).expand(1, 1, h_, w_)
    for name in SPATIAL:
        g = ll.group(name)
        v = g.velocity(torch.stack(torch.broadcast_tensors(ux, uy), -1))
        expected = 0.7 * v[..., 0] - 1.3 * v[..., 1]
        for scheme in ("central", "published"):
            got = ll.tangent(img, g, scheme)[0, 0]
            assert torch.allclose(got[1:-1, 1:-1], expected[1:-1, 1:-1], atol=ATOL["ramp"]), (name, scheme)


# --- references -------------------------------------------------------------------------

@pytest.mark.parametrize("name", SPATIAL + ["saturate"])
def test_central_is_the_limit_of_bilinear_finite_differences(name):
    """(T_eps h - T_-eps h) / 2 eps -> G h (central) as eps -> 0, border included."""
    g = ll.group(name)
    h = torch.randn(2, 3, 12, 17, dtype=torch.float64)
    exact = ll.tangent(h, g, "central")
    errors = []
    for eps in (1e-3, 1e-4, 1e-5):
        fd = (g.transform(h, eps) - g.transform(h, -eps)) / (2 * eps)
        errors.append(rel(fd, exact))
    # bilinear kinks give an O(eps) error, in pixels moved: eps * W / 2.
    assert all(e <= 3 * eps * 17 for e, eps in zip(errors, (1e-3, 1e-4, 1e-5))), errors
    assert errors[-1] < max(errors[0] / 10, 1e-9)  # translation is exact: round-off only


def test_spectral_is_exact_on_band_limited_images():
    img = smooth_image()
    h_, w_ = img.shape[-2:]
    spectrum = torch.fft.fft(img, dim=-1)
    k = torch.fft.fftfreq(w_, dtype=torch.float64) * 2 * math.pi
    d_index = torch.fft.ifft(spectrum * 1j * k, dim=-1).real
    expected = d_index * (w_ - 1) / 2  # index units -> normalized u_x units
    got = ll.tangent(img, ll.group("translate_x"), "spectral")
    assert rel(got, expected) < 1e-12
    assert h_ != w_


def _published_grid_sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The published hand-written bilinear sampler (reflection at the border), re-written
    from its description so that autograd can be compared with layerlie's closed form."""
    n, c, ih, iw = image.shape
    _, h, w, _ = grid.shape
    ix = (grid[..., 0] + 1) / 2 * (iw - 1)
    iy = (grid[..., 1] + 1) / 2 * (ih - 1)
    with torch.no_grad():
        x0, y0 = torch.floor(ix), torch.floor(iy)
    x1, y1 = x0 + 1, y0 + 1
    weights = [(x1 - ix) * (y1 - iy), (ix - x0) * (y1 - iy), (x1 - ix) * (iy - y0), (ix - x0) * (iy - y0)]

    def reflect(i, size):
        return size - 1 - (size - 1 - i.abs()).abs()

    flat = image.reshape(n, c, ih * iw)
    out = 0
    for (yy, xx), wgt in zip([(y0, x0), (y0, x1), (y1, x0), (y1, x1)], weights):
        idx = (reflect(yy, ih) * iw + reflect(xx, iw)).long().reshape(n, 1, h * w).expand(n, c, h * w)
        out = out + torch.gather(flat, 2, idx).reshape(n, c, h, w) * wgt.reshape(n, 1, h, w)
    return out


def published_transform(img: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.expand(img.shape[0], 2, 3), list(img.shape), align_corners=True)
    return _published_grid_sample(img, grid.to(img.dtype))


def double_backward_derivative(fn):
    """d fn(t) / dt at t = 0 by the published two-reverse-pass trick."""
    t = torch.zeros((), requires_grad=True)
    y = fn(t)
    v = torch.ones_like(y, requires_grad=True)
    (vj,) = torch.autograd.grad(y, t, v, create_graph=True)
    (ju,) = torch.autograd.grad(vj, v, torch.ones_like(vj))
    return ju


PUBLISHED_THETA = {
    "translate_x": lambda t: torch.stack([torch.stack([1 + 0 * t, 0 * t, t]), torch.stack([0 * t, 1 + 0 * t, 0 * t])]),
    "rotate": lambda t: torch.stack([torch.stack([t.cos(), t.sin(), 0 * t]), torch.stack([-t.sin(), t.cos(), 0 * t])]),
    "scale": lambda t: torch.stack([torch.stack([1 - t, 0 * t, 0 * t]), torch.stack([0 * t, 1 - t, 0 * t])]),
    "shear_y": lambda t: torch.stack([torch.stack([1 + 0 * t, 0 * t, 0 * t]), torch.stack([t, 1 + 0 * t, 0 * t])]),
    "stretch_x_published": lambda t: torch.stack([torch.stack([1 + t, 0 * t, 0 * t]), torch.stack([0 * t, 0 * t, 0 * t])]),
}


@pytest.mark.parametrize("name", list(PUBLISHED_THETA))
def test_published_scheme_equals_autograd_of_the_published_sampler(name):
    img = torch.randn(2, 3, 20, 23)
    tangent_ref = double_backward_derivative(lambda t: published_transform(img, PUBLISHED_THETA[name](t)[None]))
    got = ll.tangent(img, ll.group(name), "published")
    assert rel(got, tangent_ref) < 1e-5


def test_published_scheme_is_one_sided_in_stripes():
    """About 16% of affine_grid's x-coordinates land just below an integer (docs/method.md §1):
    there the published derivative is a backward difference."""
    w = 224
    ramp_sq = (torch.arange(w, dtype=torch.float32) ** 2).expand(1, 1, 4, w)
    d = ll.tangent(ramp_sq, ll.group("translate_x"), "published")[0, 0, 1, 1:-1] * 2 / (w - 1)
    j = torch.arange(1, w - 1, dtype=torch.float32)
    forward, backward = 2 * j + 1, 2 * j - 1
    is_fwd = (d - forward).abs() < 1e-2
    is_bwd = (d - backward).abs() < 1e-2
    assert bool((is_fwd | is_bwd).all())
    assert 0.05 < is_bwd.float().mean() < 0.3


# --- scheme agreement -------------------------------------------------------------------------

def test_schemes_agree_on_band_limited_images_and_differ_on_a_step():
    smooth = smooth_image(h=128, w=128, max_freq=2).float()
    g = ll.group("translate_x")
    c, s, p = (ll.tangent(smooth, g, k)[..., 8:-8, 8:-8] for k in ("central", "spectral", "published"))
    assert rel(c, s) < 0.01 and rel(p, s) < 0.1

    step = torch.zeros(1, 1, 32, 32)
    step[..., 16:] = 1.0
    c, s, p = (ll.tangent(step, g, k)[0, 0, 10] for k in ("central", "spectral", "published"))
    # central splits the jump over the two samples beside it; published puts it on one side;
    # spectral rings across the whole row.
    assert torch.count_nonzero(c[1:-1]) == 2
    assert torch.count_nonzero(p[1:-1]) == 1
    assert torch.count_nonzero(s[1:-1].abs() > 1e-3) > 20


# --- invariants and errors -----------------------------------------------------------------

def test_warp_then_unwarp_is_identity_in_the_interior():
    img = smooth_image(h=64, w=64, max_freq=1)
    for name in SPATIAL:
        g = ll.group(name)
        back = g.transform(g.transform(img, 0.05), -0.05)
        assert rel(back[..., 16:-16, 16:-16], img[..., 16:-16, 16:-16]) < 2e-3, name


def test_custom_groups_and_their_errors():
    custom = ll.Group.affine("my_rotate", [[0, 1, 0], [-1, 0, 0]])
    img = torch.randn(1, 3, 10, 10)
    for scheme in ll.list_schemes():
        assert torch.equal(ll.tangent(img, custom, scheme), ll.tangent(img, ll.group("rotate"), scheme))
    with pytest.raises(ll.LayerlieError, match="2x3"):
        ll.Group.affine("bad", [[1, 0], [0, 1]])
    with pytest.raises(ll.LayerlieError, match="NaN or inf"):
        ll.Group.affine("bad", [[float("nan"), 0, 0], [0, 0, 0]])
    with pytest.raises(ll.LayerlieError, match="numeric"):
        ll.Group.affine("bad", "rotate")
    with pytest.raises(ll.LayerlieError, match="square"):
        ll.Group.channel("bad", [[1, 0, 0]])
    with pytest.raises(ll.LayerlieError, match="4x4 generator|mixes 2 channels"):
        ll.tangent(img, ll.Group.channel("two", torch.eye(2)))
    with pytest.raises(ll.LayerlieError, match="valid groups: hyperbolic_rotate"):
        ll.group("spin")
    with pytest.raises(ll.LayerlieError, match="valid schemes"):
        ll.tangent(img, custom, "fourier")
    with pytest.raises(ll.LayerlieError, match="scheme='published'"):
        ll.tangent(img, ll.group("stretch_x_published"), "central")


def test_registered_custom_group_is_found_by_name():
    g = ll.register_group(ll.Group.channel("swap_rb", [[0, 0, 1], [0, 0, 0], [-1, 0, 0]]))
    assert ll.group("swap_rb") is g and "swap_rb" in ll.list_groups()
    assert ll.resolve_groups("translate_x,swap_rb")[1] is g
    img = torch.randn(1, 3, 4, 4)
    d = ll.lie_derivative(lambda z: z.mean((2, 3)), img, "swap_rb")  # the output is no image: J G x
    assert torch.allclose(d, ll.tangent(img, g).mean((2, 3)))


def test_group_registry_lists_sorted_names_and_names_them_in_its_error():
    names, every = ll.list_groups(), ll.list_groups(compat=True)
    assert names == sorted(names) and every == sorted(every) and set(names) < set(every)
    assert set(ll.DEFAULT_GROUPS) <= set(names)
    assert [g.name for g in ll.resolve_groups("all")][:2] == ["translate_x", "translate_y"]  # docs/method.md §1 order
    with pytest.raises(ll.LayerlieError, match=f"valid groups: {', '.join(every)}, or"):
        ll.get_group("spin")


def test_scheme_registry_lists_sorted_names_and_names_them_in_its_error():
    names = ll.list_schemes()
    assert names == sorted(names) and {"central", "published", "spectral"} <= set(names)
    assert all(ll.get_scheme(n).name == n for n in names)  # published too: an entry, never None
    with pytest.raises(ll.LayerlieError, match=f"valid schemes: {', '.join(names)}"):
        ll.get_scheme("fourier")


def test_a_registered_scheme_is_used_by_tangent():
    ll.register_scheme("forward_difference", lambda h, dim: h.roll(-1, dim) - h)
    img = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    g = ll.tangent(img, ll.group("translate_x"), "forward_difference")
    assert torch.equal(g, (img.roll(-1, -1) - img) * 4)  # 8 pixels span 2 units of u_x


def test_published_sampler_value_is_the_image_at_t0():
    img = torch.randn(2, 3, 11, 15)
    value, _, _ = published_sampler_terms(img)
    assert rel(value, img) < 1e-6


def test_calling_a_scheme_still_gives_its_derivative_with_a_warning():
    """``get_scheme(name)`` returned the axis derivative before schemes were entries."""
    h = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match=r"get_scheme\(name\)\.derivative"):
        d = ll.get_scheme("central")(h, -1)
    assert torch.equal(d, ll.get_scheme("central").derivative(h, -1))
    with pytest.warns(DeprecationWarning), pytest.raises(ll.LayerlieError, match="no axis derivative"):
        ll.get_scheme("published")(h, -1)
