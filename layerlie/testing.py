"""What layerlie's tests share, public so that a user's own tests can share it too (docs/design.md §6):
the tolerance table, :func:`registered_op` for a registration that lasts one block, the op
examples of the conformance checks, small models at fixed seeds, and :class:`LocalCluster`, a
Ray cluster of separate processes on this machine.

Every tolerance a test compares with is a name from this table, never a number typed into the
test: the name says what it bounds, and the value is the tightest one the checks pass at.

Example:
    >>> x = smooth_image(b=1, h=16, w=16)
    >>> rel(x * (1 + TOL[torch.float64] / 2), x) <= TOL[torch.float64]
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerlie.core import ops
from layerlie.core.examples import call_example, module_example
from layerlie.core.ops import register_op
from layerlie.model.loading import load_model

__all__ = [
    "ATOL", "ESTIMATOR_TOL", "RTOL", "TOL",
    "registered_op", "without_op",
    "call_example", "module_example",
    "rel", "smooth_image",
    "Fixed", "Tiny", "small_cnn", "timm_model",
    "LocalCluster",
]

# --- the tolerance table ----------------------------------------------------------------------

TOL: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float64: 1e-9}
"""Relative error of a whole computation in each dtype: a model's output or tangent against an
independent computation of it (``torch.func.jvp``, finite differences), the completeness residual."""

ESTIMATOR_TOL: dict[str, dict[torch.dtype, float]] = {
    "exact": TOL,
    "shares": {torch.float32: 1e-3, torch.float64: 1e-8},
}
"""The check of each checkable estimator (docs/method.md §4), per dtype: the completeness residual
of ``exact``; each share, and their sum against 1, of ``shares``, where a reverse pass meets a
forward one. ``hutchinson`` has no check; its error is its standard error."""

ATOL: dict[str, float] = {
    "op": 1e-14,
    "ops": 1e-13,
    "graph": 1e-12,
    "central_difference": 1e-8,
    "ramp": 1e-5,
    "traced": 1e-6,
    "logits": 1e-5,
    "norms": 1e-9,
}
"""Absolute errors, each beside a relative one (``torch.allclose``'s default where none is named).
In float64, on values of order one: the round-off of one op against another implementation of it
(``op``), of a few ops in a row or a net invariant by construction (``ops``), of a small graph:
matrix products, a layout's tangent, a defect (``graph``); a central difference at step 1e-6
against the derivative (``central_difference``); a finite-difference tangent of a linear ramp
against its exact value (``ramp``). In float32: logits or probabilities of a traced graph against
the eager model (``traced``); logits computed another way, by the engine's walk or by a model
rewritten into the same function (``logits``); attribution norms near zero (``norms``)."""

RTOL: dict[str, float] = {
    "regrouped": 1e-5,
    "central_difference": 1e-4,
    "captured": 1e-5,
}
"""Relative errors: of one float32 computation against itself with its ops regrouped (traced
against eager, batched against whole, two loadings of one model: ``regrouped``); of a central
difference at step 1e-4 of a float64 model against its derivative (``central_difference``); of a
pass replayed from a captured or compiled program against the same pass run eagerly
(``captured``)."""


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return float((a - b).norm() / b.norm())


# --- the op table for one block -----------------------------------------------------------------

@contextlib.contextmanager
def registered_op(*keys: Any, **changes: Any) -> Iterator[None]:
    """Register ops for the body of a ``with`` block, then restore the op table as it was, even
    when the body raises. Each key's entry becomes its own entry with ``changes`` (a new entry
    where it has none); with no keys, whatever the body registers is undone.

    Example:
        >>> with registered_op(nn.GELU, pointwise=False):
        ...     ops.get_op(nn.GELU).pointwise
        False
        >>> ops.get_op(nn.GELU).pointwise
        True
    """
    saved = dict(ops._OPS)
    try:
        for key in keys:
            entry = saved.get(key)
            fields = {} if entry is None else {f.name: getattr(entry, f.name)
                                               for f in dataclasses.fields(entry) if f.name != "key"}
            register_op(key, **{**fields, **changes})
        yield
    finally:
        ops._OPS.clear()
        ops._OPS.update(saved)


@contextlib.contextmanager
def without_op(*keys: Any) -> Iterator[None]:
    """Remove the entries of ``keys`` for the body of a ``with`` block, as for an op that layerlie
    does not know, then restore the op table as it was.

    Example:
        >>> import torch.nn.functional as F
        >>> with without_op(F.pad):
        ...     ops.find_op(F.pad) is None
        True
    """
    with registered_op():
        for key in keys:
            del ops._OPS[key]
        yield


# --- inputs and models ------------------------------------------------------------------------

def smooth_image(b: int = 2, c: int = 3, h: int = 24, w: int = 28, dtype: torch.dtype = torch.float64,
                 max_freq: int = 3) -> torch.Tensor:
    """A band-limited periodic image ``(b, c, h, w)``: a few low-frequency cosines per channel."""
    g = torch.Generator().manual_seed(1)
    yy = torch.arange(h, dtype=dtype)[:, None] * 2 * torch.pi / h
    xx = torch.arange(w, dtype=dtype)[None, :] * 2 * torch.pi / w
    out = torch.zeros(b, c, h, w, dtype=dtype)
    for ky in range(max_freq + 1):
        for kx in range(max_freq + 1):
            a = torch.randn(b, c, 1, 1, generator=g, dtype=dtype)
            ph = torch.rand(b, c, 1, 1, generator=g, dtype=dtype) * 2 * torch.pi
            out = out + a * torch.cos(ky * yy + kx * xx + ph)
    return out


@functools.lru_cache(maxsize=8)
def timm_model(name: str, **kwargs: object) -> nn.Module:
    """A random-init timm model at seed 0, built once per process (so shared: do not change it)."""
    torch.manual_seed(0)
    return load_model(name, **kwargs)


def small_cnn(dtype: torch.dtype = torch.float64) -> nn.Module:
    """conv, GELU, a strided conv, tanh, global pooling and a linear head, at seed 0, in eval mode."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 3, stride=2),
                         nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).to(dtype).eval()


class Tiny(nn.Module):
    """A small CNN as a user writes one: conv, batch norm, ReLU, pooling, a linear head."""

    def __init__(self, in_chans: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.head(h.mean((2, 3)))


class Fixed(nn.Module):
    """A model that runs at one input size only: its head reads the flattened feature map."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4 * (height // 2) * (width // 2), 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


# --- a Ray cluster of separate processes --------------------------------------------------------

class LocalCluster:
    """A Ray cluster on this machine: a head that runs no tasks, and worker nodes added one by
    one, each a ``ray start`` process tree with its own temporary folder under one root
    (docs/design.md §4).

    Every process it starts names that root in its command line, so :meth:`shutdown` finds them
    all and kills them by their pids, whatever state a failed test left them in, and touches no
    other Ray on the machine. The processes get this one's environment with ``env`` on top, and
    token authentication off.

    Example:
        >>> with LocalCluster() as cluster:  # doctest: +SKIP
        ...     cluster.add_node(num_cpus=1)
        ...     ll.sweep("spec.toml", "out/", address=cluster.address)
    """

    def __init__(self, *, object_store_memory: int = 80_000_000, env: Mapping[str, str] | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="llc", dir="/tmp"))  # short: Ray's socket paths are limited
        self.object_store_memory = object_store_memory
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4", **(env or {})}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[str] = []

    def start(self) -> LocalCluster:
        """Start the head node (no CPUs, so that tasks run on the worker nodes only)."""
        self._ray_start("head", "--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=false")
        return self

    def add_node(self, *, num_cpus: int = 1, resources: Mapping[str, float] | None = None) -> str:
        """Start a worker node with ``num_cpus`` and custom ``resources``; returns its name."""
        name = f"n{len(self.nodes) + 1}"
        self._ray_start(name, f"--address={self.address}", f"--num-cpus={num_cpus}",
                        *([f"--resources={json.dumps(dict(resources))}"] if resources else []))
        self.nodes.append(name)
        return name

    def node_id(self, name: str) -> str:
        """The Ray node id of the node ``name``, as a sweep's ``node`` column records it."""
        return self._raylet(name)[1]

    def kill_node(self, name: str) -> None:
        """SIGKILL the raylet of the node ``name``: the node dies with its workers."""
        os.kill(self._raylet(name)[0], signal.SIGKILL)

    def pids(self) -> list[int]:
        """The live processes this cluster started."""
        return [pid for pid, _ in self._processes()]

    def shutdown(self) -> None:
        """Kill every process of this cluster by its pid, and remove its folder."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.shutdown()
            raise

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _ray_start(self, name: str, *args: str) -> None:
        ray = Path(sys.executable).with_name("ray")
        command = [str(ray), "start", *args, f"--temp-dir={self.root / name}", "--node-ip-address=127.0.0.1",
                   f"--object-store-memory={self.object_store_memory}", "--disable-usage-stats"]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"ray start {name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def _raylet(self, name: str) -> tuple[int, str]:
        folder = f"--temp_dir={self.root / name}"
        for pid, args in self._processes():
            if args[0].endswith("/raylet") and folder in args:
                node = next(a for a in args if a.startswith("--node_id="))
                return pid, node.removeprefix("--node_id=")
        raise RuntimeError(f"node {name!r} has no raylet running under {self.root}")

    def _processes(self) -> list[tuple[int, list[str]]]:
        marker, out = str(self.root), []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if int(pid) != os.getpid() and any(marker in a for a in args):
                out.append((int(pid), args))
        return out
