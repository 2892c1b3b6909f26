"""One dialect across the public API (docs/design.md §2): the same names for the same things,
options by keyword, the old spellings kept for one release with a DeprecationWarning, and the
CLI flags spelled as the Python names."""

from __future__ import annotations

import inspect
import warnings

import pandas as pd
import pytest
import torch
from torch import nn

import layerlie as ll
from layerlie.cli.main import build_parser
from layerlie.deprecation import renamed

MEASUREMENTS = [ll.lee, ll.lie_derivative, ll.attribute, ll.aliasing, ll.with_aliasing, ll.consistency, ll.eq_t,
                ll.eq_t_frac, ll.eq_r, ll.invariance, ll.metrics, ll.ablate, ll.antialias, ll.report, ll.Monitor,
                ll.trace, ll.load_model, ll.photos, ll.photo_batch, ll.images]
OLD_NAMES = {"x_probe", "example", "probes", "draws", "pairs"}


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()


def images(b: int = 2, side: int = 16) -> torch.Tensor:
    return torch.randn(b, 3, side, side, generator=torch.Generator().manual_seed(1))


# --- the mechanism ------------------------------------------------------------------------

@renamed(positional=("scale",), draws="samples")
def scaled(x: float, *, scale: float = 1.0, samples: int = 1) -> float:
    return x * scale * samples


def test_an_old_keyword_still_binds_and_warns_with_the_new_name():
    with pytest.warns(DeprecationWarning, match=r"^scaled\(\): draws= is deprecated; pass samples= instead$"):
        old = scaled(2.0, draws=3)
    assert old == scaled(2.0, samples=3) == 6.0


def test_an_old_positional_option_still_binds_and_warns():
    with pytest.warns(DeprecationWarning, match=r"scale by position is deprecated; pass scale= instead"):
        assert scaled(2.0, 5.0) == scaled(2.0, scale=5.0) == 10.0


def test_the_new_name_alone_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scaled(2.0, scale=2.0, samples=2) == 8.0


@pytest.mark.parametrize("call, twice", [
    (lambda: scaled(1.0, draws=2, samples=2), r"got samples twice, draws= and samples="),
    (lambda: scaled(1.0, 2.0, scale=2.0), r"got scale twice, scale by position and scale="),
])
def test_an_option_given_twice_is_an_error(call, twice):
    with pytest.raises(TypeError, match=twice), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        call()


def test_too_many_positional_arguments_still_fail():
    with pytest.raises(TypeError), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scaled(1.0, 2.0, 3)


def test_the_signature_shows_the_new_names():
    assert list(inspect.signature(scaled).parameters) == ["x", "scale", "samples"]


# --- the public API -----------------------------------------------------------------------

@pytest.mark.parametrize("fn", MEASUREMENTS, ids=lambda f: f.__name__)
def test_options_are_keyword_only_and_spelled_once(fn):
    params = inspect.signature(fn).parameters.values()
    assert not OLD_NAMES & {p.name for p in params}
    positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD and p.default is not p.empty]
    assert set(positional) <= {"x", "groups", "which"}, positional


def test_old_names_of_the_metrics_give_the_same_values():
    model, x = small_net(), images()
    for metric, old in [(ll.consistency, "pairs"), (ll.eq_t, "draws"), (ll.eq_r, "draws")]:
        options = {"node": "features"} if metric is not ll.consistency else {"max_shift": 2}
        with pytest.warns(DeprecationWarning, match=f"{old}= is deprecated; pass samples="):
            before = metric(model, x, **{old: 2}, **options)
        assert torch.equal(before, metric(model, x, samples=2, **options))
    with pytest.warns(DeprecationWarning, match="draws= is deprecated"):
        before = ll.invariance(model, x, "rotate", 0.1, draws=3)
    assert torch.equal(before, ll.invariance(model, x, "rotate", 0.1, samples=3))


def test_old_names_of_attribute_trace_and_antialias_give_the_same_results():
    model, x = small_net(), images(1)
    with pytest.warns(DeprecationWarning, match="probes= is deprecated; pass samples="):
        old = ll.attribute(model, x, "rotate", estimator="hutchinson", probes=4, seed=3)
    new = ll.attribute(model, x, "rotate", estimator="hutchinson", samples=4, seed=3)
    pd.testing.assert_frame_equal(old.nodes, new.nodes)
    with pytest.warns(DeprecationWarning, match="example= is deprecated; pass x="):
        gm = ll.trace(model, example=x)
    assert torch.equal(gm(x), ll.trace(model, x=x)(x))
    with pytest.warns(DeprecationWarning, match=r"^antialias\(\): example= is deprecated"):
        blurred = ll.antialias(model, example=x)
    assert torch.equal(blurred(x), ll.antialias(model, x=x)(x))


def test_load_model_and_photos_take_options_by_keyword():
    with pytest.warns(DeprecationWarning, match=r"^load_model\(\): pretrained by position is deprecated"):
        model = ll.load_model(small_net(), False)
    with pytest.warns(DeprecationWarning, match=r"^photos\(\): n by position is deprecated; pass n= instead"):
        x = ll.photos(model, 1, size=16)
    assert torch.equal(x, ll.photos(model, n=1, size=16))
    with pytest.raises(TypeError, match="got n twice"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ll.photos(model, 1, n=1)


def test_the_monitor_takes_x():
    model, x = small_net(), images(1)
    with pytest.warns(DeprecationWarning, match=r"^Monitor\(\): x_probe= is deprecated; pass x= instead"):
        old = ll.Monitor(model, x_probe=x, groups="translate_x")
    assert torch.equal(old.x, ll.Monitor(model, x, "translate_x").x)


def test_every_metric_gives_its_table_and_still_its_tensor():
    model, x = small_net(), images()
    scores = ll.eq_t(model, x, node="features", samples=2)
    assert isinstance(scores, torch.Tensor) and scores.shape == (2,) and scores.dtype == torch.float64
    assert type(scores.mean()) is torch.Tensor
    assert list(scores.table.columns) == ["image", "metric", "value"]
    assert scores.table["value"].tolist() == scores.tolist() and set(scores.table["metric"]) == {"eq_t"}
    pd.testing.assert_frame_equal(ll.metrics(model, x, which=["eq_t"], eq_t={"samples": 2}), scores.table)


# --- the command line ---------------------------------------------------------------------

@pytest.mark.parametrize("command, old, new, dest, value", [
    ("e2e", "--batch", "--batch-size", "batch_size", 2),
    ("e2e", "--seed", "--init-seed", "init_seed", 3),
    ("layers", "--probes", "--samples", "samples", 7),
    ("report", "--seed", "--init-seed", "init_seed", 3),
])
def test_old_flags_still_parse_with_a_note_and_are_hidden(capsys, command, old, new, dest, value):
    parser = build_parser()
    args = parser.parse_args([command, "resnet18", old, str(value)])
    assert getattr(args, dest) == value == getattr(parser.parse_args([command, "resnet18", new, str(value)]), dest)
    assert capsys.readouterr().err == f"layerlie: note: {old} is deprecated; use {new}\n"
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    shown = capsys.readouterr().out
    assert new in shown and f"{old} " not in shown
