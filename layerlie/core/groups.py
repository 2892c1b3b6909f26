"""One-parameter groups acting on images (docs/method.md §1).

A spatial group is ``g_t = exp(t M)`` for a 2x3 affine generator ``M`` acting on
normalized coordinates ``(u_x, u_y, 1)`` (``affine_grid`` convention,
``align_corners=True``: the first and last pixel centres sit at -1 and 1). It moves an
image by ``(T_t h)(u) = h(g_t u)``; its velocity field is ``v(u) = M (u, 1)``.

A channel group acts on the values of every pixel: ``T_t h = exp(t A) h`` along the
channel axis, for a ``C x C`` generator ``A``.

Groups live in a registry: :func:`group` finds one by name, :func:`list_groups` lists
them, :func:`register_group` adds a custom one. A custom group can also be written as text,
the same text on the command line and in Python (:func:`parse_group`), or defined in a TOML
file (:func:`load_groups`).

Example:
    >>> import layerlie as ll
    >>> g = ll.group("rotate")
    >>> g.matrix(0.1).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from layerlie.errors import LayerlieError, note

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

GroupKind = Literal["affine", "channel"]


@dataclass(frozen=True, eq=False)
class Group:
    """A one-parameter group of image transforms (docs/method.md §1).

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

DEFAULT_GROUPS: tuple[str, ...] = ("translate_x", "rotate")
"""The groups measured when none are given: the Monitor, :func:`layerlie.ablate`, a sweep and
``layerlie layers``. The LEE's default is ``"all"``, the built-ins."""


def register_group(g: Group, *, builtin: bool = False) -> Group:
    """Add ``g`` to the registry, so that its name works everywhere a built-in's does."""
    _GROUPS[g.name] = g
    if builtin:
        _BUILTIN.append(g.name)
    return g


def list_groups(compat: bool = False) -> list[str]:
    """The names of the registered groups, sorted: the built-ins (docs/method.md §1 table) and
    custom ones. Compatibility maps that are not groups are listed only with ``compat=True``."""
    return sorted(n for n, g in _GROUPS.items() if compat or g.origin is None)


def group(spec: str | Group) -> Group:
    """A group by name, by its text form (see :func:`parse_group`), or the group itself; an
    unknown name raises a :class:`LayerlieError` that lists the valid ones.

    Example:
        >>> group("translate_x").generator[0, 2].item()
        1.0
    """
    if isinstance(spec, Group):
        return spec
    return parse_group(spec)


_CUSTOM = re.compile(r"(affine|channel):([^=]*)=(.*)", re.DOTALL)
_FORM = ("write a custom group as 'affine:NAME=a,b,c;d,e,f' (the rows of the 2x3 generator) or "
         "'channel:NAME=row1;row2;row3' (a C x C generator)")


def parse_group(spec: str) -> Group:
    """A group from its text: a registered name, or a generator written row by row (docs/method.md §1).

    ``"affine:NAME=a,b,c;d,e,f"`` is ``Group.affine(NAME, [[a, b, c], [d, e, f]])``;
    ``"channel:NAME=row1;...;rowC"`` is ``Group.channel``. Both are validated as those are.

    Example:
        >>> parse_group("affine:tilt=0,0.5,0;0,0,0").generator.tolist()
        [[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]]
    """
    text = spec.strip()
    custom = _CUSTOM.fullmatch(text)
    if custom is None:
        if text.startswith(("affine:", "channel:")):
            raise LayerlieError(f"cannot read group {spec!r}: {_FORM}")
        if text not in _GROUPS:
            raise LayerlieError(f"unknown group {spec!r}; valid groups: {', '.join(list_groups(compat=True))}, "
                                f"or {_FORM}")
        return _GROUPS[text]
    kind, name, body = custom.group(1), custom.group(2).strip(), custom.group(3)
    if not re.fullmatch(r"[A-Za-z_][\w.-]*", name):
        raise LayerlieError(f"group {spec!r}: the name {name!r} must start with a letter and hold only letters, "
                            f"digits, '_', '.', '-'; {_FORM}")
    try:
        rows = [[float(v) for v in row.split(",")] for row in body.split(";")]
    except ValueError:
        raise LayerlieError(f"group {spec!r}: the generator must be numbers; {_FORM}") from None
    shape = [len(r) for r in rows]
    if len(set(shape)) != 1 or (kind == "affine" and shape != [3, 3]):
        raise LayerlieError(f"cannot read group {spec!r}: rows of {shape} numbers; {_FORM}")
    return Group.affine(name, rows) if kind == "affine" else Group.channel(name, rows)


def load_groups(path: str | Path) -> list[Group]:
    """The groups a TOML file defines, in file order.

    Each ``[groups.NAME]`` table holds ``affine = [[a, b, c], [d, e, f]]`` (a 2x3 generator)
    or ``channel = [[...], ...]`` (a C x C generator), and may hold ``convention = "..."``.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "groups.toml"
        >>> _ = f.write_text("[groups.tilt]\\naffine = [[0, 0.5, 0], [0, 0, 0]]\\n")
        >>> [g.name for g in load_groups(f)]
        ['tilt']
    """
    form = "write each group as [groups.NAME] with affine = [[a, b, c], [d, e, f]] or channel = [[...], ...]"
    try:
        with open(path, "rb") as file:
            spec = tomllib.load(file)
    except OSError as err:
        raise LayerlieError(f"cannot read groups file {str(path)!r} ({err.strerror}); give the path of a "
                            "TOML file") from None
    except tomllib.TOMLDecodeError as err:
        raise LayerlieError(f"groups file {str(path)!r} is not valid TOML ({err}); {form}") from None
    tables = spec.get("groups")
    if not isinstance(tables, dict) or not tables or set(spec) != {"groups"}:
        raise LayerlieError(f"groups file {str(path)!r} defines no [groups.NAME] tables only; {form}")
    groups = []
    for name, table in tables.items():
        kinds = [k for k in ("affine", "channel") if isinstance(table, dict) and k in table]
        if len(kinds) != 1 or set(table) - {"affine", "channel", "convention"}:
            raise LayerlieError(f"groups file {str(path)!r}, group {name!r}: {form} (and an optional "
                                "convention = \"...\")")
        make = Group.affine if kinds[0] == "affine" else Group.channel
        groups.append(make(name, table[kinds[0]], str(table.get("convention", f"custom {kinds[0]} generator"))))
    return groups


get_group = group
"""The registry's ``get_*`` name for :func:`group`."""


def resolve_groups(spec: str | Group | Iterable[str | Group], channels: int | None = None) -> list[Group]:
    """Groups from ``"all"`` (the ten built-ins), names, text forms (:func:`parse_group`),
    TOML files (:func:`load_groups`), or groups: a comma-separated string or a list.

    Args:
        spec: the groups.
        channels: the images' channel count, where known: ``"all"`` leaves out the channel
            groups whose generator has another size (with a note), and naming one is an error.

    Example:
        >>> [g.name for g in resolve_groups("rotate,affine:tilt=0,0.5,0;0,0,0")]
        ['rotate', 'tilt']
    """
    items = [spec] if isinstance(spec, Group) else _split(spec) if isinstance(spec, str) else list(spec)
    groups: dict[str, Group] = {}
    left_out: list[str] = []
    for item in items:
        for g in _expand(item):
            if channels is not None and g.kind == "channel" and g.generator.shape[0] != channels:
                if item != "all":
                    raise LayerlieError(f"group {g.name!r} mixes {g.generator.shape[0]} channels, the images have "
                                        f"{channels}; leave it out, or define a {channels}x{channels} channel group")
                left_out.append(g.name)
                continue
            seen = groups.setdefault(g.name, g)
            if not _same(seen, g):
                raise LayerlieError(f"two different groups are named {g.name!r}; give the custom one another "
                                    "name")
    if left_out:
        plural = "s" if channels != 1 else ""
        note(f"groups='all' leaves out {', '.join(left_out)}: a channel group that does not fit images of "
             f"{channels} channel{plural}")
    if not groups:
        raise LayerlieError(f"no group given; valid groups: {', '.join(list_groups())}, or {_FORM}")
    return list(groups.values())


def _split(spec: str) -> list[str]:
    """Split at commas, except those between the numbers of a written generator."""
    items: list[str] = []
    for token in (t.strip() for t in spec.split(",")):
        if items and _CUSTOM.fullmatch(items[-1]) and _numbers(token):
            items[-1] += "," + token
        elif token:
            items.append(token)
    return items


def _numbers(token: str) -> bool:
    try:
        [float(v) for v in token.split(";")]
    except ValueError:
        return False
    return True


def _expand(item: str | Group) -> list[Group]:
    if isinstance(item, Group):
        return [item]
    if item == "all":
        return [_GROUPS[n] for n in _BUILTIN]
    if item.endswith(".toml"):
        return load_groups(item)
    return [parse_group(item)]


def _same(a: Group, b: Group) -> bool:
    origins_match = (a.origin is None) == (b.origin is None) and (a.origin is None or torch.equal(a.origin, b.origin))
    return a is b or (a.kind == b.kind and torch.equal(a.generator, b.generator) and origins_match)


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
