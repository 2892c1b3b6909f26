"""One-parameter groups acting on images (METHOD 1).

A spatial group is ``g_t = exp(t M)`` for a 2x3 affine generator ``M`` acting on
normalized coordinates ``(u_x, u_y, 1)`` (``affine_grid`` convention,
``align_corners=True``: the first and last pixel centres sit at -1 and 1). It moves an
image by ``(T_t h)(u) = h(g_t u)``; its velocity field is ``v(u) = M (u, 1)``.

A channel group acts on the values of every pixel: ``T_t h = exp(t A) h`` along the
channel axis, for a ``C x C`` generator ``A``.

Groups live in a registry: :func:`group` finds one by name, :func:`list_groups` lists
them, :func:`register_group` adds a custom one.

Example:
    >>> import layerlie as ll
    >>> g = ll.group("rotate")
    >>> g.matrix(0.1).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from layerlie.errors import LayerlieError

GroupKind = Literal["affine", "channel"]


@dataclass(frozen=True, eq=False)
class Group:
    """A one-parameter group of image transforms (METHOD 1).

    Attributes:
        name: registry name.
        kind: ``"affine"`` (moves positions) or ``"channel"`` (mixes channel values).
        generator: ``M`` (2, 3) for affine groups, ``A`` (C, C) for channel groups, float64.
        convention: direction, units and sign, in words.
        origin: the affine map at ``t = 0`` when it is not the identity. Only the
            published stretch compatibility maps have one; they are not groups.
    """

    name: str
    kind: GroupKind
    generator: torch.Tensor
    convention: str = ""
    origin: torch.Tensor | None = field(default=None)

    @classmethod
    def affine(cls, name: str, generator: Sequence[Sequence[float]] | torch.Tensor,
               convention: str = "custom affine generator") -> Group:
        """A spatial group from its 2x3 generator ``M`` in normalized coordinates.

        Example:
            >>> Group.affine("my_translate_x", [[0, 0, 1], [0, 0, 0]]).velocity(torch.zeros(2))
            tensor([1., 0.])
        """
        m = _as_generator(name, generator)
        if m.shape != (2, 3):
            raise LayerlieError(
                f"group {name!r}: an affine generator is 2x3 (rows acting on (u_x, u_y, 1)), "
                f"got shape {tuple(m.shape)}; pass e.g. [[0, 0, 1], [0, 0, 0]] for translate_x")
        return cls(name, "affine", m, convention)

    @classmethod
    def channel(cls, name: str, generator: Sequence[Sequence[float]] | torch.Tensor,
                convention: str = "custom channel generator") -> Group:
        """A colour group from its ``C x C`` generator ``A``: ``T_t h = exp(t A) h``.

        Example:
            >>> Group.channel("brighten", torch.eye(3)).kind
            'channel'
        """
        a = _as_generator(name, generator)
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise LayerlieError(
                f"group {name!r}: a channel generator is a square C x C matrix, got shape "
                f"{tuple(a.shape)}; pass e.g. torch.eye(3) for saturate")
        return cls(name, "channel", a, convention)

    @property
    def spatial(self) -> bool:
        return self.kind == "affine"

    def homogeneous(self) -> torch.Tensor:
        """The 3x3 generator ``[[M], [0, 0, 0]]`` of an affine group."""
        self._require_affine("homogeneous")
        return torch.cat([self.generator, self.generator.new_zeros(1, 3)])

    def matrix(self, t: float) -> torch.Tensor:
        """The finite transform at ``t``: ``exp(t M)`` (2, 3) for affine groups, ``exp(t A)``
        (C, C) for channel groups, float64."""
        if self.origin is not None:
            return self.origin + t * self.generator
        if self.spatial:
            return torch.linalg.matrix_exp(t * self.homogeneous())[:2]
        return torch.linalg.matrix_exp(t * self.generator)

    def velocity(self, u: torch.Tensor) -> torch.Tensor:
        """The velocity field ``v(u) = M (u, 1)`` at normalized positions ``u: (..., 2)``."""
        self._require_affine("velocity")
        m = self.generator.to(u)
        return u @ m[:, :2].T + m[:, 2]

    def transform(self, x: torch.Tensor, t: float, padding_mode: str = "zeros") -> torch.Tensor:
        """Apply the finite transform ``T_t`` to ``x: (B, C, H, W)``.

        Affine groups resample ``x`` at ``g_t u`` with bilinear ``grid_sample``
        (``align_corners=True``); channel groups multiply the channel axis by ``exp(t A)``.
        """
        mat = self.matrix(t).to(x)
        if not self.spatial:
            return torch.einsum("dc,bc...->bd...", mat, x)
        theta = mat.expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode,
                             align_corners=True)

    def _require_affine(self, what: str) -> None:
        if not self.spatial:
            raise LayerlieError(f"group {self.name!r} acts on channels; {what} exists only for "
                                "affine groups")

    def __repr__(self) -> str:
        return f"Group({self.name!r}, {self.kind}, generator={self.generator.tolist()})"


def _as_generator(name: str, generator: Sequence[Sequence[float]] | torch.Tensor) -> torch.Tensor:
    try:
        m = torch.as_tensor(generator, dtype=torch.float64).clone()
    except (TypeError, ValueError, RuntimeError) as err:
        raise LayerlieError(f"group {name!r}: the generator must be a numeric matrix ({err})") from None
    if not torch.isfinite(m).all():
        raise LayerlieError(f"group {name!r}: the generator has NaN or inf entries")
    return m


_GROUPS: dict[str, Group] = {}
_BUILTIN: list[str] = []


def register_group(g: Group, *, builtin: bool = False) -> Group:
    """Add ``g`` to the registry, so that its name works everywhere a built-in's does."""
    _GROUPS[g.name] = g
    if builtin:
        _BUILTIN.append(g.name)
    return g


def list_groups(compat: bool = False) -> list[str]:
    """The built-in group names (METHOD 1 table) followed by registered custom ones.
    Compatibility maps that are not groups are listed only with ``compat=True``."""
    return [n for n, g in _GROUPS.items() if compat or g.origin is None]


def group(spec: str | Group) -> Group:
    """A group by name (or the group itself).

    Example:
        >>> group("translate_x").generator[0, 2].item()
        1.0
    """
    if isinstance(spec, Group):
        return spec
    if spec not in _GROUPS:
        raise LayerlieError(f"unknown group {spec!r}; valid groups: {', '.join(list_groups(compat=True))}")
    return _GROUPS[spec]


get_group = group
"""The registry's ``get_*`` name for :func:`group`."""


def resolve_groups(spec: str | Group | Iterable[str | Group]) -> list[Group]:
    """Groups from ``"all"`` (the ten built-ins), a comma-separated string, or a list."""
    if isinstance(spec, Group):
        return [spec]
    if isinstance(spec, str):
        spec = _BUILTIN if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    groups = [group(s) for s in spec]
    if not groups:
        raise LayerlieError(f"no group given; valid groups: {', '.join(list_groups())}")
    return groups


_AFFINE = {
    "translate_x": ([[0, 0, 1], [0, 0, 0]], "content moves by -t along x: samples h(u_x + t, u_y); "
                    "t = 1 is half the image width"),
    "translate_y": ([[0, 0, 0], [0, 0, 1]], "content moves by -t along y (rows): samples h(u_x, u_y + t)"),
    "rotate": ([[0, 1, 0], [-1, 0, 0]], "samples h(R(t) u) with R = [[cos, sin], [-sin, cos]]; t in radians"),
    "scale": ([[-1, 0, 0], [0, -1, 0]], "samples h(e^-t u): t > 0 zooms in about the centre"),
    "shear_x": ([[0, 1, 0], [0, 0, 0]], "samples h(u_x + t u_y, u_y)"),
    "shear_y": ([[0, 0, 0], [1, 0, 0]], "samples h(u_x, u_y + t u_x)"),
    "stretch_x": ([[1, 0, 0], [0, 0, 0]], "samples h(e^t u_x, u_y): the true group diag(e^t, 1)"),
    "stretch_y": ([[0, 0, 0], [0, 1, 0]], "samples h(u_x, e^t u_y): the true group diag(1, e^t)"),
    "hyperbolic_rotate": ([[0, 1, 0], [1, 0, 0]], "samples h(H(t) u) with H = [[cosh, sinh], [sinh, cosh]]"),
}
for _name, (_m, _conv) in _AFFINE.items():
    register_group(Group.affine(_name, _m, _conv), builtin=True)
register_group(Group("saturate", "channel", torch.eye(3, dtype=torch.float64),
                     "T_t h = e^t h in the model's normalized input space, as published"), builtin=True)

# The published stretch: theta = diag(1 + t, 0). Not a group (t = 0 collapses the image
# onto its middle row); kept under explicit names to reproduce published numbers.
for _name, _o, _m in [("stretch_x_published", [[1, 0, 0], [0, 0, 0]], [[1, 0, 0], [0, 0, 0]]),
                      ("stretch_y_published", [[0, 0, 0], [0, 1, 0]], [[0, 0, 0], [0, 1, 0]])]:
    register_group(Group(_name, "affine", torch.tensor(_m, dtype=torch.float64),
                         "published degenerate stretch diag(1 + t, 0); compatibility only, "
                         "needs scheme='published'", origin=torch.tensor(_o, dtype=torch.float64)))
