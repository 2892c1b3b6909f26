"""Figures drawn from a real tiny sweep's store: files written, one artist per model or variant,
and Spearman's rho against a rank-correlation reference."""

import pandas as pd
import pytest
import torch

import layerlie as ll
from layerlie.views import figures
from layerlie.cli import main
from layerlie.results.store import TABLES, manifest

MODELS = ["resnet18", "resnet10t"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    spec = dict(models=MODELS, groups=["translate_x", "rotate"], measures=["e2e", "layers", "metrics", "ablation"],
                n=3, size=32, seed=0, layers={"groups": ["translate_x"], "alias": True},
                metrics={"which": ["consistency", "invariance"]}, ablation={"variants": ["blurpool", "filtered"]})
    result = ll.sweep(spec, root, workers=0, progress=False)
    assert not result.failed, result.failed
    return root


@pytest.fixture(scope="module")
def tables(store):
    return {t: ll.load(store, t) for t in TABLES}


@pytest.fixture(scope="module")
def accuracy(tables):
    """Each model's top-1 agreement with resnet18 on the sweep's photos: measured, not typed."""
    torch.manual_seed(0)
    rows, reference = [], None
    for name in MODELS:
        torch.manual_seed(0)
        model = ll.load_model(name)
        x = torch.nn.functional.interpolate(ll.photo_batch(model, n=3).x, size=(32, 32), mode="bilinear")
        with torch.no_grad():
            pred = model(x).argmax(-1)
        reference = pred if reference is None else reference
        rows.append(dict(model=name, accuracy=float((pred == reference).double().mean())))
    return pd.DataFrame(rows)


def _saved(fig, tmp_path, name):
    for suffix in (".png", ".pdf"):
        fig.savefig(tmp_path / f"{name}{suffix}")
        assert (tmp_path / f"{name}{suffix}").stat().st_size > 1000
    assert fig.axes[0].get_title() and fig.axes[0].get_xlabel()


def test_depth_has_one_line_per_model(store, tables, tmp_path):
    fig = figures.depth(tables["layers"], spec=manifest(store)["spec"])
    assert len(fig.axes[0].get_lines()) == len(MODELS)
    assert "n=3" in fig.axes[0].get_title() and "random init" in fig.axes[0].get_title()
    _saved(fig, tmp_path, "depth")


def test_by_type_bars_sum_to_one_per_model_and_group(tables, tmp_path):
    fig = figures.by_type(tables["layers"])
    bars = fig.axes[0].containers
    kinds = tables["layers"]["layer_type"].unique()
    assert 0 < len(bars) <= len(kinds)
    ends = [max(p.get_x() + p.get_width() for p in stack) for stack in zip(*bars)]
    assert len(ends) == len(MODELS) and all(e == pytest.approx(1) for e in ends)
    _saved(fig, tmp_path, "by_type")


def test_e2e_groups_has_one_marker_series_per_model(tables, tmp_path):
    fig = figures.e2e_groups(tables["e2e"])
    assert len(fig.axes[0].containers) == len(MODELS)
    _saved(fig, tmp_path, "e2e")


def test_lee_vs_accuracy_has_one_point_per_model(tables, accuracy, tmp_path):
    fig = figures.lee_vs_accuracy(tables["e2e"], accuracy)
    assert len(fig.axes[0].collections) == len(MODELS)
    _saved(fig, tmp_path, "accuracy")
    with pytest.raises(figures.FigureError, match="no accuracy column"):
        figures.lee_vs_accuracy(tables["e2e"], accuracy.drop(columns="accuracy"))


def test_lee_vs_metrics_prints_spearman_of_the_points(tables, tmp_path):
    fig = figures.lee_vs_metrics(tables["e2e"], tables["metrics"], group="translate_x")
    metrics = tables["metrics"]["metric"].unique()
    assert len(fig.axes) == len(metrics)
    inv = tables["metrics"].query("metric == 'invariance' and group == 'translate_x'")
    pts = tables["e2e"].query("group == 'translate_x'").merge(inv, on=["model", "image"])
    ranks = pts[["lee", "value"]].rank()
    reference = ranks["lee"].corr(ranks["value"])
    rho, _ = figures.spearman(pts["lee"], pts["value"])
    assert rho == pytest.approx(reference, abs=1e-12)
    text = [t.get_text() for t in fig.axes[list(metrics).index("invariance")].texts]
    assert any(f"rho = {reference:.2f}" in t and "p = " in t for t in text)
    _saved(fig, tmp_path, "metrics")


def test_ablation_has_one_point_per_variant_and_model(tables, tmp_path):
    fig = figures.ablation(tables["ablation"])
    assert len(fig.axes[0].collections) == 2 * len(MODELS)
    _saved(fig, tmp_path, "ablation")


def test_top_layers_marks_the_alias_flagged_bars(tables, tmp_path):
    fig = figures.top_layers(tables["layers"], model="resnet18", k=10)
    bars = fig.axes[0].containers[0]
    assert len(bars) == 10
    rows = tables["layers"].query("model == 'resnet18' and group == 'translate_x'")
    top = rows.nlargest(10, "contribution_norm")
    assert sum(bool(b.get_hatch()) for b in bars) == int(top["flagged"].sum()) > 0
    _saved(fig, tmp_path, "top")


def test_cli_figures_writes_png_and_pdf_and_notes_the_absent_table(store, tmp_path, capsys):
    assert main(["figures", str(store), "--out", str(tmp_path / "figs")]) == 0
    err = capsys.readouterr().err
    assert "lee_vs_accuracy: skipped, no accuracy column" in err and err.count("\n") == 1
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    assert {f"{n}.{s}" for n in ("depth", "by_type", "e2e_groups", "lee_vs_metrics", "ablation", "top_layers")
            for s in ("png", "pdf")} == names


def test_titles_say_the_weights_the_rows_record_and_assume_none(tables):
    layers = tables["layers"]
    assert set(layers["weights"]) == {"random init (seed 0)"}
    assert figures.depth(layers).axes[0].get_title().endswith("\nrandom init (seed 0)")
    unrecorded = figures.depth(layers.drop(columns="weights")).axes[0].get_title()
    assert unrecorded.endswith("\nweights not recorded") and "random init" not in unrecorded


def test_for_store_draws_the_registered_store_figures_in_order(tables):
    drawn = figures.for_store(tables, model="resnet18")
    store_figures = [name for name in ll.list_figures() if ll.get_figure(name).in_store]
    assert sorted(drawn) == store_figures and "monitor" not in drawn
    assert list(drawn)[:3] == ["depth", "by_type", "e2e_groups"]
    assert drawn["lee_vs_accuracy"].startswith("lee_vs_accuracy: skipped, no accuracy column")
