"""layerlie.testing and the suite's own rules: the tolerance table covers every dtype and
estimator the tests use and nothing else, ``registered_op`` restores the op table whatever the
block does, and no test reaches into another module's private names or types a tolerance in."""

from __future__ import annotations

import ast
import importlib
import re
import socket
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import layerlie as ll
import layerlie.testing
from layerlie.core import ops
from layerlie.testing import ATOL, ESTIMATOR_TOL, RTOL, TOL, registered_op, without_op

TESTS = Path(__file__).parent
SOURCES = sorted(TESTS.glob("*.py"))


# --- the tolerance table ----------------------------------------------------------------------

def test_every_checkable_estimator_has_a_tolerance_in_both_float_dtypes():
    checkable = {e for e in ll.ESTIMATORS if ll.CHECKS[e] != "not checkable"}
    assert set(ESTIMATOR_TOL) == checkable
    for tol in (TOL, *ESTIMATOR_TOL.values()):
        assert set(tol) == {torch.float32, torch.float64}
        assert tol[torch.float64] < tol[torch.float32] < 1
    assert ESTIMATOR_TOL["exact"] is TOL


def _keys_used(table: str) -> set[str]:
    text = "\n".join(p.read_text() for p in SOURCES if p.name != Path(__file__).name)
    return set(re.findall(rf'\b{table}\[(torch\.\w+|"\w+")\]', text))


def test_the_table_has_an_entry_for_each_name_the_tests_use_and_no_other():
    assert {str(dtype) for dtype in TOL} >= _keys_used("TOL")
    for table, entries in (("ATOL", ATOL), ("RTOL", RTOL)):
        assert _keys_used(table) == {f'"{k}"' for k in entries}, table


# --- the op table for one block ---------------------------------------------------------------

class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_registered_op_restores_the_table_when_the_body_raises():
    before = ll.list_ops()
    with pytest.raises(RuntimeError, match="in the block"), registered_op(nn.GELU, pointwise=False):
        ll.register_layer_type(Gate, "norm")
        assert not ops.get_op(nn.GELU).pointwise and ll.get_layer_type(Gate) == "norm"
        raise RuntimeError("in the block")
    assert ll.list_ops() == before and ops.get_op(nn.GELU).pointwise and ops.find_op(Gate) is None


def test_without_op_removes_an_entry_for_the_block_only():
    before = ll.list_ops()
    with without_op(nn.GELU):
        assert ops.find_op(nn.GELU) is None
    assert ll.list_ops() == before


def test_no_network_records_and_refuses_every_connection(no_network):
    with pytest.raises(OSError, match="no network in this test"):
        socket.create_connection(("127.0.0.1", 9), timeout=0.1)
    assert no_network == [("127.0.0.1", 9)]


# --- how tests reach the package --------------------------------------------------------------

def _module(name: str) -> ModuleType | None:
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    return module


def _resolve(node: ast.expr, names: dict[str, ModuleType]) -> ModuleType | None:
    """The layerlie module that ``node`` (a name or a dotted attribute) stands for, if any."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, names)
        if base is not None and not node.attr.startswith("_"):
            found = getattr(base, node.attr, None)
            return found if isinstance(found, ModuleType) else _module(f"{base.__name__}.{node.attr}")
    return None


def _own(test_file: str, module: ModuleType) -> bool:
    """Whether ``test_file`` is one of ``module``'s own test files: test_<module>.py or test_<module>_*.py."""
    stem = module.__name__.rsplit(".", 1)[-1]
    return test_file == f"test_{stem}.py" or test_file.startswith(f"test_{stem}_")


def violations(source: str, test_file: str) -> list[str]:
    """The private names of other layerlie modules that ``source`` reaches (imported, read as an
    attribute, or patched by name), and the numbers typed in as ``atol=`` or ``rtol=``."""
    tree = ast.parse(source)
    names: dict[str, ModuleType] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "layerlie":  # ``import a.b`` binds ``a``, ``import a.b as c`` binds a.b
                    bound = alias.name if alias.asname else "layerlie"
                    names[alias.asname or bound] = _module(bound)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "layerlie":
            module = _module(node.module)
            for alias in node.names:
                if alias.name.startswith("_") and not _own(test_file, module):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
                child = _module(f"{node.module}.{alias.name}")
                if child is not None:
                    names[alias.asname or alias.name] = child
        elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
              and ast.unparse(node.value.func) == "importlib.import_module"
              and isinstance(node.value.args[0], ast.Constant) and node.value.args[0].value.startswith("layerlie")):
            names.update({t.id: _module(node.value.args[0].value) for t in node.targets if isinstance(t, ast.Name)})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            module = _resolve(node.value, names)
            if module is not None and not _own(test_file, module):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Call) and len(node.args) >= 2:  # monkeypatch.setattr(module, "_name"), getattr
            target, key = node.args[:2]
            module = _resolve(target, names)
            if (module is not None and isinstance(key, ast.Constant) and isinstance(key.value, str)
                    and key.value.startswith("_") and not _own(test_file, module)):
                found.append(f"{node.lineno}: {ast.unparse(node.func)}({ast.unparse(target)}, {key.value!r})")
        if isinstance(node, ast.keyword) and node.arg in ("atol", "rtol"):
            typed = [c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)
                     and isinstance(c.value, (int, float)) and c.value != 0]
            if typed:
                found.append(f"{node.value.lineno}: {node.arg}={ast.unparse(node.value)}")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_tests_use_public_names_and_the_tolerance_table(path):
    assert not violations(path.read_text(), path.name), "use a public name (or test the private helper from " \
        "its own module's test file) and a tolerance from layerlie.testing"


@pytest.mark.parametrize(("source", "test_file"), [
    ("from layerlie.core.ops import _OPS", "test_probe.py"),
    ("from layerlie.core import ops\nops._OPS.pop(1)", "test_probe.py"),
    ("import layerlie as ll\nll.core.ops._OPS.clear()", "test_lie.py"),
    ("import layerlie.core.engine as e\ndef test(monkeypatch):\n    monkeypatch.setattr(e, '_vmap_jvp', None)",
     "test_rules_attention.py"),
    ("import importlib\nengine = importlib.import_module('layerlie.core.engine')\nengine._vmap_jvp", "test_lie.py"),
    ("import torch\ntorch.allclose(a, b, atol=1e-6)", "test_lie.py"),
    ("from layerlie.testing import TOL\ntorch.allclose(a, b, atol=10 * TOL[torch.float32])", "test_lie.py"),
], ids=["import", "attribute", "chain", "patched", "imported-by-name", "atol", "scaled"])
def test_the_scan_finds_each_kind_of_fault(source, test_file):
    assert len(violations(source, test_file)) == 1


def test_the_scan_allows_a_module_its_own_private_names_and_exact_comparisons():
    assert not violations("from layerlie.core import ops\nops._OPS", "test_ops.py")
    assert not violations("from layerlie.core.layout import _Seeded", "test_layout_windows.py")
    assert not violations("from layerlie.testing import ATOL\nf(atol=ATOL['op'], rtol=0)", "test_lie.py")
    assert layerlie.testing.__all__ and all(not n.startswith("_") for n in layerlie.testing.__all__)
