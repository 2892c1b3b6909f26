"""``layerlie sweep --check`` (docs/design.md §4): every model of a spec built at random init and
traced, on ``meta`` where that suffices, and the ones that fail listed with their reason."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from timm.models import register_model
from torch import nn

from layerlie.cli import main
from layerlie.results import check as ck
from layerlie.results.spec import read_spec
from layerlie.results.sweep import tasks

PAPER = Path(__file__).resolve().parents[1] / "sweeps" / "paper.toml"


class Branchy(nn.Module):
    """A model whose forward branches on a value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y.mean((2, 3)) if y.sum() > 0 else -y.mean((2, 3))


@torch.fx.wrap
def scaled_by_its_largest(y: torch.Tensor) -> torch.Tensor:
    """A call the graph keeps as one node, which reads a value: a meta tensor has none."""
    return y / (1.0 + abs(y.max().item()))


class Counting(nn.Module):
    """A model that traces, but whose graph reads a value (``.item()``) when it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_by_its_largest(self.conv(x).mean((2, 3)))


@register_model
def layerlie_branchy_test(**_: object) -> nn.Module:
    return Branchy()


def test_check_names_a_model_that_does_not_trace(capsys):
    spec = {"models": ["resnet18", "layerlie_branchy_test"], "groups": ["rotate"], "size": 32}
    results = ck.check(spec)
    assert [r.ok for r in results] == [True, False]
    assert results[0].device == "meta"
    (line,) = ck.failures(results)
    assert line.startswith("layerlie_branchy_test: trace: torch.fx cannot trace Branchy: ")
    assert "control flow" in line


def test_cli_check_exits_non_zero_and_lists_the_failure(tmp_path, capsys):
    toml = tmp_path / "spec.toml"
    toml.write_text('models = ["layerlie_branchy_test", "resnet18"]\nsize = 32\n')
    assert main(["sweep", str(toml), "--check"]) == 1
    out, err = capsys.readouterr()
    assert "resnet18: ok (meta" in out and "2 models checked, 1 failed" in out
    assert err.startswith("layerlie: failed: layerlie_branchy_test: trace: torch.fx cannot trace Branchy")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    toml.write_text('models = ["resnet18"]\nsize = 32\n')
    assert main(["sweep", str(toml), "--check"]) == 0
    capsys.readouterr()
    assert main(["sweep", str(toml)]) == 2  # a sweep that runs needs its store
    assert "give a SPEC and --store to run a sweep" in capsys.readouterr().err


def test_a_step_that_meta_cannot_run_falls_back_to_the_cpu(monkeypatch):
    module = type(sys)("layerlie_counting_test")
    module.counting = Counting
    monkeypatch.setitem(sys.modules, "layerlie_counting_test", module)
    (result,) = ck.check({"models": ["layerlie_counting_test:counting"], "size": 16})
    assert result.ok and result.device == "cpu"


def test_the_fallback_still_reports_a_real_shape_failure(monkeypatch):
    # a model built for 32 px run at 16 px fails on the CPU too: that failure is the one reported
    module = type(sys)("layerlie_fixed_test")
    module.fixed = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    monkeypatch.setitem(sys.modules, "layerlie_fixed_test", module)
    (result,) = ck.check({"models": ["layerlie_fixed_test:fixed"], "size": 16})
    assert (result.step, result.device) == ("shapes", "cpu")
    assert "shapes cannot be multiplied" in result.reason


def test_paper_spec_covers_the_published_families_at_full_scale():
    spec = read_spec(PAPER, weights=False)  # the weights are named, not fetched: this machine has none
    names = [m["name"] for m in spec["models"]]
    assert len(names) >= 100 and all(m["pretrained"] for m in spec["models"])
    families = ("resnet", "efficientnet", "convnext", "regnet", "mobilenet", "vit_", "deit", "beit", "swin",
                "cait", "levit", "mixer", "resmlp", "coatnet", "maxvit", "mobilevit")
    assert all(any(n.startswith(f) for n in names) for f in families)
    assert len(spec["groups"]) == 10 and sorted(spec["measures"]) == ["ablation", "e2e", "layers", "metrics"]
    assert spec["layers"]["estimator"] == "exact"
    assert len(tasks(spec)) == len(names) * (2 * len(spec["groups"]) + 2)


@pytest.mark.parametrize("broken", ["meta", "cpu"])
def test_the_check_fails_when_a_step_is_broken(monkeypatch, broken):
    real = ck._batch

    def bad(model: nn.Module, size: object, device: str) -> torch.Tensor:
        x = real(model, size, device)
        return x[:, :1] if device == broken or broken == "cpu" else x  # one channel: a shape error

    monkeypatch.setattr(ck, "_batch", bad)
    (result,) = ck.check({"models": ["resnet18"], "size": 32})
    assert (result.ok, result.step) == (broken == "meta", "ok" if broken == "meta" else "shapes")


def test_a_layout_pass_that_raises_is_the_models_reason(monkeypatch):
    def broken(*_: object) -> None:
        raise RuntimeError("no rule for this node")

    monkeypatch.setattr(ck, "infer_layouts", broken)
    (result,) = ck.check({"models": ["resnet18"], "size": 32})
    assert (result.step, result.reason, result.device) == ("layouts", "no rule for this node", "cpu")
