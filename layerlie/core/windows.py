"""Windowed tensors: a grid's samples relabelled by reshapes, permutes and rolls (docs/method.md §5, Windows).

Window attention cuts a grid ``(B, H, W, C)`` into windows ``(B * nW, w, w, C)`` (Swin, MaxViT's
block attention) or into dilated grids (MaxViT's grid attention), and Swin rolls the grid before
it cuts it. None of that moves a sample: it only relabels the samples. :class:`Windows` records
the relabelling: the grid's axes cut into factors (atoms), the order in which the tensor holds the
atoms, and a cyclic shift of the grid. Any such tensor can then be put back together
(:meth:`Windows.assemble`) and cut again (:meth:`Windows.partition`), and ``G`` on it is ``G`` of
the assembled grid, cut again: partition, reverse and roll have no defect.

A roll is a relabelling too: the sample that the roll carries across the border keeps its own
position, so it is not an affine change of the positions (an offset shift would put the wrapped
samples a whole grid away from where they are). The assembled grid is the unrolled one.

Example:
    >>> import torch
    >>> g = torch.randn(1, 8, 8, 3)
    >>> w = Windows.of_grid(g.shape, 1, 2).reshaped((1, 8, 8, 3), (1, 2, 4, 2, 4, 3))
    >>> w = w.permuted((1, 2, 4, 2, 4, 3), (0, 1, 3, 2, 4, 5)).reshaped((1, 2, 2, 4, 4, 3), (4, 4, 4, 3))
    >>> torch.equal(w.assemble(w.partition(g, (4, 4, 4, 3))), g)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

Atom = tuple[int, int]


@dataclass(frozen=True)
class Windows:
    """How a tensor's axes are cut from a grid (docs/method.md §5, Windows).

    Attributes:
        grid: the grid's shape; axis 0 is the batch, ``y_dim`` and ``x_dim`` are spatial, the
            others are channels.
        atoms: the grid's axes cut into factors larger than 1, as ``(grid axis, size)``, in
            the grid's row-major order (outer factors first).
        order: the tensor's atoms, outermost first, as indices into ``atoms``; every axis of
            the tensor holds consecutive ones.
        roll: the grid was rolled by ``(sy, sx)`` samples (``torch.roll``) before being cut.
    """

    grid: tuple[int, ...]
    y_dim: int
    x_dim: int
    atoms: tuple[Atom, ...]
    order: tuple[int, ...]
    roll: tuple[int, int] = (0, 0)

    @classmethod
    def of_grid(cls, shape: Sequence[int], y_dim: int, x_dim: int) -> Windows:
        """The identity relabelling of a grid of ``shape``."""
        atoms = tuple((a, int(n)) for a, n in enumerate(shape) if n > 1)
        return cls(tuple(int(n) for n in shape), y_dim, x_dim, atoms, tuple(range(len(atoms))))

    def same_grid(self, other: Windows) -> bool:
        """Whether ``other`` cuts the batch and the spatial axes of the grid as this one does."""
        def cut(w: Windows) -> tuple[Atom, ...]:
            return tuple(a for i, a in enumerate(w.atoms) if not w.is_channel(i))

        return (self.y_dim, self.x_dim, self.roll) == (other.y_dim, other.x_dim, other.roll) and cut(self) == cut(other)

    def atoms_of(self, axis: int) -> list[int]:
        """The atoms cut from grid axis ``axis``, outer first."""
        return [i for i, (a, _) in enumerate(self.atoms) if a == axis]

    def is_channel(self, i: int) -> bool:
        return self.atoms[i][0] not in (0, self.y_dim, self.x_dim)

    def groups(self, shape: Sequence[int]) -> list[list[int]] | None:
        """The atoms of each axis of a tensor of ``shape``, or None when they do not tile it."""
        sizes = [self.atoms[i][1] for i in self.order]
        out, k = [], 0
        for n in shape:
            group, p = [], 1
            while p < n and k < len(sizes):
                p *= sizes[k]
                group.append(self.order[k])
                k += 1
            if p != n:
                return None
            out.append(group)
        return out if k == len(sizes) else None

    def reshaped(self, src: Sequence[int], out: Sequence[int]) -> Windows | None:
        """After ``reshape(out)``: atoms cut further where an axis of ``out`` ends inside one."""
        if math.prod(src) != math.prod(out) or self.groups(src) is None:
            return None
        atoms, order = list(self.atoms), list(self.order)
        ends = [math.prod(out[:k + 1]) for k in range(len(out))]
        for q in ends:
            p = 1
            for k, i in enumerate(order):
                size = atoms[i][1]
                if p < q < p * size:
                    f = q // p
                    if q % p or size % f:
                        return None  # an axis of out mixes parts of atoms: not a relabelling we know
                    atoms[i:i + 1] = [(atoms[i][0], f), (atoms[i][0], size // f)]
                    order = [j + (j > i) for j in order]
                    order[k:k + 1] = [i, i + 1]
                    break
                p *= size
                if p >= q:
                    break
        return replace(self, atoms=tuple(atoms), order=tuple(order))

    def permuted(self, src: Sequence[int], perm: Sequence[int]) -> Windows | None:
        """After ``permute(perm)`` of a tensor of shape ``src``."""
        groups = self.groups(src)
        if groups is None:
            return None
        return replace(self, order=tuple(i for d in perm for i in groups[d]))

    def rolled(self, src: Sequence[int], shifts: Sequence[int], dims: Sequence[int]) -> Windows | None:
        """After ``torch.roll(shifts, dims)``, for axes that each hold a whole spatial axis."""
        groups = self.groups(src)
        if groups is None:
            return None
        roll = list(self.roll)
        for s, d in zip(shifts, dims):
            for k, axis in enumerate((self.y_dim, self.x_dim)):
                if groups[d % len(src)] == self.atoms_of(axis) and groups[d % len(src)]:
                    roll[k] = (roll[k] + s) % self.grid[axis]
                    break
            else:
                return None
        return replace(self, roll=(roll[0], roll[1]))

    def resized(self, src: Sequence[int], out: Sequence[int]) -> Windows | None:
        """After an op that changes only axes made of channel atoms (a linear layer, a chunk
        of heads)."""
        groups = self.groups(src)
        if groups is None or len(out) != len(src):
            return None
        sizes = {}
        for d, (a, b) in enumerate(zip(src, out)):
            if a == b:
                continue
            if not groups[d] or not all(self.is_channel(i) for i in groups[d]):
                return None
            sizes.update({i: 1 for i in groups[d]})
            sizes[groups[d][0]] = int(b)
        return self._with_sizes(sizes)

    def dropped(self, src: Sequence[int], dim: int) -> Windows | None:
        """After ``unbind(dim)``: the axis goes, and it must hold channels only."""
        groups = self.groups(src)
        if groups is None or not all(self.is_channel(i) for i in groups[dim]):
            return None
        return self._with_sizes({i: 1 for i in groups[dim]})

    def _with_sizes(self, sizes: dict[int, int]) -> Windows:
        """Atoms resized (size 1 drops them); the grid's channel axes follow."""
        kept, index = [], {}
        for i, (a, n) in enumerate(self.atoms):
            n = sizes.get(i, n)
            if n > 1:
                index[i] = len(kept)
                kept.append((a, n))
        grid = tuple(math.prod(n for a, n in kept if a == axis) for axis in range(len(self.grid)))
        order = tuple(index[i] for i in self.order if i in index)
        return replace(self, grid=grid, atoms=tuple(kept), order=order)

    def assemble(self, h: torch.Tensor) -> torch.Tensor:
        """The grid whose samples ``h`` holds, unrolled: ``(*grid)``."""
        inverse = sorted(range(len(self.order)), key=self.order.__getitem__)
        g = h.reshape([self.atoms[i][1] for i in self.order]).permute(inverse).reshape(self.grid)
        if any(self.roll):
            g = g.roll((-self.roll[0], -self.roll[1]), (self.y_dim, self.x_dim))
        return g

    def partition(self, g: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """The inverse of :meth:`assemble`: a grid cut as the tensor of ``shape`` is."""
        if any(self.roll):
            g = g.roll(self.roll, (self.y_dim, self.x_dim))
        return g.reshape([n for _, n in self.atoms]).permute(self.order).reshape(tuple(shape))
