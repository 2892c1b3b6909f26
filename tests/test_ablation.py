"""Before/after ablations of the anti-aliased variants (docs/method.md §6)."""

from __future__ import annotations

import functools

import pytest
import torch

import layerlie as ll
from layerlie.cli import main
from layerlie.testing import TOL, timm_model


@functools.lru_cache(maxsize=1)
def resnet_ablation() -> ll.Ablation:
    model = timm_model("resnet18")
    x = ll.photos(model, n=2)[..., ::2, ::2]
    labels = model(x).argmax(-1).detach()
    labels[1] = (labels[1] + 1) % 1000  # one right, one wrong
    return ll.ablate(model, x, variants=["blurpool", "filtered", "all"], groups=["translate_x", "rotate"],
                     labels=labels)


def test_all_substitutes_lower_the_translation_lee_of_resnet18():
    t = resnet_ablation().table.set_index("variant")
    assert list(t.index) == ["original", "blurpool", "filtered", "all"]
    assert t.loc["original", "replaced"] == 0 and (t.loc[["blurpool", "filtered", "all"], "replaced"] > 0).all()
    # measured here: about 15x for "all" at 112 x 112 (benchmarks/RESULTS.md has the factors)
    assert t.loc["all", "factor_translate_x"] > 2
    assert t.loc["all", "lee_translate_x"] < t.loc["original", "lee_translate_x"]
    assert (t["residual"] <= TOL[torch.float32]).all()
    assert t.loc["original", "top1_agreement"] == 1 and t.loc["original", "output_change"] == 0
    assert t.loc["original", "accuracy"] == 0.5
    assert ((t["output_change"] >= 0) & (t["output_change"] <= 1)).all()


def test_filtered_variant_moves_the_nonlinearity_contribution():
    ab = resnet_ablation()
    by_type = ab.by_type
    assert by_type.loc["nonlinearity", "filtered"] < by_type.loc["nonlinearity", "original"]
    assert by_type.loc["strided/downsampling", "blurpool"] < by_type.loc["strided/downsampling", "original"]
    fig = ab.plot()
    assert len(fig.axes) == 2


def test_ablate_rejects_bad_input():
    model = timm_model("resnet18")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ll.LayerlieError, match="unknown variant.*valid variants: all, aps, blurpool, both, filtered"):
        ll.ablate(model, x, variants=["sharpen"])
    with pytest.raises(ll.LayerlieError, match="labels must have shape"):
        ll.ablate(model, x, variants=["blurpool"], labels=torch.tensor([1, 2]))


def test_cli_ablate_prints_the_table_and_writes_the_figure(capsys, tmp_path):
    plot = tmp_path / "ablation.png"
    code = main(["ablate", "resnet18", "--n", "1", "--variants", "blurpool", "--groups", "translate_x",
                 "--estimator", "shares", "--plot", str(plot), "--out", str(tmp_path / "ablation.csv")])
    out = capsys.readouterr().out
    assert code == 0 and "LEE translate_x reduction" in out and "blurpool" in out
    assert plot.stat().st_size > 1000 and (tmp_path / "ablation.csv").exists()
    code = main(["ablate", "resnet18", "--n", "1", "--variants", "blur"])
    assert code == 2 and "valid variants" in capsys.readouterr().err


def test_a_variant_with_nothing_to_replace_is_left_out_with_a_warning():
    torch.manual_seed(0)
    linear_cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                                     torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.warns(UserWarning, match="variant left out, filtered: nothing to replace"):
        ab = ll.ablate(linear_cnn, x, variants=["blurpool", "filtered"], groups=["translate_x"])
    assert list(ab.table["variant"]) == ["original", "blurpool"]
    with pytest.raises(ll.LayerlieError, match="no variant applies; filtered: nothing to replace"):
        ll.ablate(linear_cnn, x, variants=["filtered"], groups=["translate_x"])


def test_variants_policies_and_figures_are_registries():
    assert ll.list_variants() == ["all", "aps", "blurpool", "both", "filtered"]
    assert ll.get_variant("filtered") == dict(blurpool=False, activations="filtered")
    assert ll.list_policies() == ["aps", "blurpool", "filtered"]
    with pytest.raises(ll.LayerlieError, match="unknown surgery policy 'sharpen'; valid surgery policies: aps, blurpool"):
        ll.get_policy("sharpen")
    assert "top_layers" in ll.list_figures() and ll.get_figure("lee_vs_metrics").tables == ("e2e", "metrics")
    with pytest.raises(ll.LayerlieError, match="unknown figure 'histogram'; valid figures: ablation, by_type"):
        ll.get_figure("histogram")
