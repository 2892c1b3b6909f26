"""torchvision's classification models, one per family, as a user builds them (docs/method.md §3-5):
completeness at float32 precision and at most 5% unknown layouts; then MaxViT's own window and
grid partitions (``torch.swapaxes``, ``torch.einsum``) as relabellings and attention pairs.
``benchmarks/zoo.py`` measures every model of the list at its default size."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import maxvit, swin_transformer

import layerlie as ll
from layerlie.testing import TOL

MAX_UNKNOWN = 0.05


def _small_swin(v2: bool) -> nn.Module:
    """torchvision's Swin (V2) with 4 x 4 windows, so that 32 px give shifted windows."""
    blocks = dict(block=swin_transformer.SwinTransformerBlockV2,
                  downsample_layer=swin_transformer.PatchMergingV2) if v2 else {}
    return swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                            window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=10, **blocks)


def _small_maxvit() -> nn.Module:
    """torchvision's MaxViT for 32 px: 2 x 2 windows and grids on 8 x 8 and 4 x 4 maps."""
    return maxvit.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                         block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)


def _small_convnext() -> nn.Module:
    config = torchvision.models.convnext.CNBlockConfig
    return torchvision.models.ConvNeXt([config(16, 32, 1), config(32, None, 1)], num_classes=10)


def _with_batch_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy whose batch norms hold the statistics of ``x``: EfficientNet's random-init
    activations shrink stage by stage under unit running statistics, to logits of about 1e-14,
    where the completeness check is absolute and cannot fail."""
    fitted = copy.deepcopy(model)
    for m in fitted.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        fitted.train()(x)
    return fitted.eval()


FAMILIES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet": (lambda: torchvision.models.resnet18(num_classes=10), 32),
    "mobilenet_v3": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 64),
    "efficientnet": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 64),
    "convnext": (_small_convnext, 32),
    "regnet": (lambda: torchvision.models.regnet_y_400mf(num_classes=10), 32),
    "swin": (lambda: _small_swin(v2=False), 32),
    "swin_v2": (lambda: _small_swin(v2=True), 32),
    "maxvit": (_small_maxvit, 32),
}
SLOW = {"efficientnet"}


@pytest.mark.parametrize("family", [pytest.param(f, marks=[pytest.mark.slow] if f in SLOW else []) for f in FAMILIES])
def test_family_is_complete_and_has_its_layouts(family):
    """completeness: exact contributions sum to L F at float32 precision (rotate: a field that
    varies in space); at most 5% of the tensor nodes have an unknown layout (docs/method.md §5)."""
    make, size = FAMILIES[family]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    if family == "efficientnet":
        model = _with_batch_statistics(model, x)
    a = ll.attribute(model, x, "rotate")
    assert not a.degenerate
    assert a.residual <= TOL[torch.float32], a.check_line()
    tensors = a.nodes[a.nodes["tensor"]]
    assert (tensors["layout"] == "unknown").mean() <= MAX_UNKNOWN, a.unknown_line()


class Partitioned(nn.Module):
    """MaxViT's block partition, then its grid partition (``torch.swapaxes``), a per-token
    channel mix inside each, and the departitions: an equivariant map of relabellings only."""

    def __init__(self, channels: int = 4, p: int = 2, n: int = 8):
        super().__init__()
        self.p, self.g = p, n // p
        self.mix = nn.Linear(channels, channels, bias=False)  # a bias is a constant: G of it is not 0
        self.cut, self.join = maxvit.WindowPartition(), maxvit.WindowDepartition()
        self.swap = maxvit.SwapAxes(-2, -3)

    def forward(self, x):
        h = self.join(self.mix(self.cut(x, self.p)), self.p, self.g, self.g)
        h = self.cut(h, self.g)  # grid: windows of g x g spaced samples, after the swap
        h = self.swap(self.mix(self.swap(h)))
        return self.join(h, self.g, self.p, self.p)


@pytest.mark.parametrize("group", ["translate_x", "rotate"])
def test_maxvit_partitions_have_no_defect(group):
    """analytic: every node relabels samples or mixes channels, so every e_v is 0 and so is L F;
    a node left unknown (G = 0) would carry the whole derivative of its input as its defect."""
    torch.manual_seed(0)
    model = Partitioned().double().eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    a = ll.attribute(model, x, group, output="logits")
    nodes = a.nodes.set_index("node")
    assert "unknown" not in set(nodes["layout"])
    assert nodes["target"].str.contains("swapaxes").sum() == 2
    assert nodes["local_norm"].max() < TOL[torch.float64]
    assert float(a.total.norm()) < TOL[torch.float64]


def test_maxvit_attention_maps_are_pairs():
    """docs/method.md §5, pair layouts: ``einsum("BGHID,BGHJD->BGHIJ", q, k)``, the bias, the softmax over
    keys, and ``einsum("BGHIJ,BGHJD->BGHID", A, v)`` back to windows, in block and grid attention."""
    torch.manual_seed(0)
    gm = ll.trace(_small_maxvit().eval())
    lay = ll.infer_layouts(gm, torch.randn(1, 3, 32, 32))
    einsums = [n.name for n in gm.graph.nodes if n.target is torch.einsum]
    softmaxes = [n.name for n in gm.graph.nodes if "softmax" in n.name]
    assert len(einsums) == 8 and len(softmaxes) == 4
    assert all(lay[n].key_windows is not None for n in einsums[::2] + softmaxes)
    assert all(lay[n].kind == "windows" and lay[n].key_windows is None for n in einsums[1::2])

