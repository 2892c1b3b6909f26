"""The estimator registry (docs/method.md §4): names, errors, and a registered estimator
used by ``ll.attribute`` at node and module granularity."""

from __future__ import annotations

import math

import pytest
import torch
from layerlie.testing import smooth_image
from torch import nn

import layerlie as ll


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten()).double().eval()


class Rademacher:
    """Probes of +-1, counted."""

    def __init__(self) -> None:
        self.draws = 0

    def __call__(self, shape: torch.Size, *, dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator) -> torch.Tensor:
        self.draws += 1
        return torch.randint(0, 2, shape, dtype=dtype, device=device, generator=generator) * 2 - 1


def test_estimator_registry_lists_sorted_names_and_names_them_in_its_error():
    names = ll.list_estimators()
    assert names == sorted(names) and {"exact", "shares", "hutchinson"} <= set(names)
    assert [ll.get_estimator(n).runs for n in ("exact", "shares", "hutchinson")] == ["forward", "reverse", "probes"]
    with pytest.raises(ll.LayerlieError, match=f"valid estimators: {', '.join(names)}"):
        ll.get_estimator("bootstrap")
    with pytest.raises(ll.LayerlieError, match="valid estimators: exact"):
        ll.attribute(net(), smooth_image(b=1, h=8, w=8), "rotate", estimator="bootstrap")
    with pytest.raises(ll.LayerlieError, match="runs must be one of forward, reverse, probes"):
        ll.Estimator("bootstrap", "resample")


@pytest.mark.parametrize("granularity", ["node", "module"])
def test_a_registered_estimator_is_used_by_attribute(granularity):
    probe = Rademacher()
    ll.register_estimator(ll.Estimator("rademacher", "probes", probe=probe))
    assert "rademacher" in ll.list_estimators()
    x = smooth_image(b=1, h=8, w=8)
    a = ll.attribute(net(), x, "rotate", estimator="rademacher", probes=7, granularity=granularity)
    assert probe.draws == 7 and a.settings["estimator"] == "rademacher"
    assert a.check == "not checkable" and math.isnan(a.residual)
    exact = ll.attribute(net(), x, "rotate", granularity=granularity).nodes.set_index("node")["contribution_norm"]
    probed = a.nodes.set_index("node")["contribution_norm"]
    assert ((probed > 0) == (exact > 0)).all()  # the same nodes contribute, by either estimate
