"""The model contract on models a user writes (docs/design.md §2): each through every public measurement.

- references: each measurement of a user's model (in training mode, with a tuple, dict or
  ``.logits`` output, one channel, float64) equals the measurement of its eval-mode twin that
  returns the logits tensor, or is a one-line ``LayerlieError`` that names the fix;
- completeness: the exact and the shares checks hold on every such model (docs/method.md §4);
- invariants: the caller's module is unchanged by every call: its state dict, every module's
  training flag and plain attributes (``inplace``), its parameters' ``requires_grad`` and
  ``.grad``, and every hook dict (:func:`snapshot`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerlie as ll
from layerlie.cli import main
from layerlie.model.loading import input_channels
from layerlie.testing import TOL, rel

SIZE, BATCH = 32, 2


class Logits:
    """What some libraries return: an object with a ``logits`` attribute (not a dict, not a tuple)."""

    def __init__(self, logits: torch.Tensor, features: torch.Tensor) -> None:
        self.logits, self.features = logits, features


class Net(nn.Module):
    """Conv, BatchNorm, in-place ReLU, a strided conv, global pooling and a linear head; ``out``
    says what forward returns: the logits, ``(logits, features)``, a dict or a :class:`Logits`."""

    def __init__(self, channels: int = 3, out: str = "tensor", attention: str | None = None) -> None:
        super().__init__()
        self.out, self.attention = out, attention
        self.conv1, self.bn1, self.act1 = nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(True)
        if attention == "mha":
            self.mix = nn.MultiheadAttention(16, 2, batch_first=True)
        elif attention == "sdpa":
            self.qkv = nn.Linear(16, 48)
        self.fc = nn.Linear(16, 5)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """Self-attention over the feature map's positions, on torch's own attention, as a residual."""
        b, c, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)
        if self.attention == "mha":
            mixed = self.mix(t, t, t, need_weights=False)[0]  # the fused fast path in eval mode
        else:
            q, k, v = self.qkv(t).reshape(b, -1, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
            mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        return h + mixed.transpose(1, 2).reshape(b, c, hh, ww)

    def forward(self, x: torch.Tensor) -> Any:
        h = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        if self.attention is not None:
            h = self.attend(h)
        features = F.adaptive_avg_pool2d(h, 1).flatten(1)
        logits = self.fc(features)
        if self.out == "tuple":
            return logits, features
        if self.out == "dict":
            return {"logits": logits, "features": features}
        return Logits(logits, features) if self.out == "object" else logits


def images(channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, channels, SIZE, SIZE, generator=g)


def trained(model: nn.Module, channels: int = 3, steps: int = 3) -> nn.Module:
    """A few SGD steps, as a user's training loop leaves the model: in training mode, BatchNorm
    statistics and ``.grad`` filled in, a frozen layer, a hook of the user's own."""
    model.bn1.requires_grad_(False)
    model.fc.register_forward_hook(lambda module, args, out: None)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = images(channels), torch.tensor([0, 3])
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        F.cross_entropy(logits, y).backward()
        opt.step()
    return model


class Case(NamedTuple):
    build: Callable[[], nn.Module]
    channels: int
    notes: tuple[str, ...]  # what the notes of a call on the model say, one pattern each


TRAINING, FIRST, CAST = "in training mode: measured in eval mode on a copy", "its first tensor", "cast to the model's"

MODELS = {
    "trained_cnn": Case(lambda: trained(Net()), 3, (TRAINING,)),
    "tuple": Case(lambda: trained(Net(out="tuple")), 3, (TRAINING, FIRST)),
    "dict": Case(lambda: Net(out="dict").eval(), 3, ()),
    "logits_object": Case(lambda: Net(out="object").eval(), 3, ()),
    "one_channel": Case(lambda: trained(Net(channels=1), channels=1), 1, (TRAINING,)),
    "float64": Case(lambda: Net().double().eval(), 3, (CAST,)),
    "multihead_attention": Case(lambda: trained(Net(attention="mha")), 3, (TRAINING,)),
    "sdpa": Case(lambda: Net(attention="sdpa", out="tuple").eval(), 3, (FIRST,)),
}
"""The user-style models, by name: how to build one, its input channels, and its notes."""


def build(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor, Case]:
    """The model, its twin (an eval-mode copy that returns the logits tensor), the images, the case."""
    torch.manual_seed(0)
    case = MODELS[name]
    model = case.build()
    twin = copy.deepcopy(model).eval()
    twin.out = "tensor"
    return model, twin, images(case.channels), case


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything of a module that a measurement could change."""
    plain = (bool, int, float, str, type(None))
    return dict(
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        modules=[(name, type(m), {k: v for k, v in vars(m).items() if isinstance(v, plain)},
                  {k: dict(v) for k, v in vars(m).items() if k.endswith("hooks") and isinstance(v, dict)})
                 for name, m in model.named_modules()],
        params=[(name, p.requires_grad, p.grad is None, p.grad.clone() if p.grad is not None else None)
                for name, p in model.named_parameters()])


def assert_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    after = snapshot(model)
    assert before["modules"] == after["modules"]
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert v.dtype == after["state"][k].dtype and torch.equal(v, after["state"][k]), k
    for (name, req, none, grad), (_, req2, none2, grad2) in zip(before["params"], after["params"]):
        assert (req, none) == (req2, none2) and (none or torch.equal(grad, grad2)), name


@contextlib.contextmanager
def notes(*patterns: str, all_of: bool = True) -> Iterator[None]:
    """The body's warnings are one-line notes, each matching a pattern; with ``all_of``, every
    pattern is matched by one of them."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", UserWarning)  # the others as the suite sets them
        yield
    for w in seen:
        assert issubclass(w.category, ll.Note) and "\n" not in str(w.message), str(w.message)
        assert any(re.search(p, str(w.message)) for p in patterns), str(w.message)
    if all_of:
        for p in patterns:
            assert any(re.search(p, str(w.message)) for w in seen), p


@contextlib.contextmanager
def contract(model: nn.Module, case: Case) -> Iterator[None]:
    """A call on the caller's model: its notes, and the model unchanged afterwards."""
    before = snapshot(model)
    with notes(*case.notes):
        yield
    assert_unchanged(before, model)


def tol(model: nn.Module) -> float:
    return TOL[next(model.parameters()).dtype]


def lee_of(f: nn.Module, x: torch.Tensor, groups: list[str]) -> torch.Tensor:
    """The published LEE by hand, ``mean |L softmax(f(x))|`` per group and image (docs/method.md §2)."""
    with torch.no_grad():
        x = x.to(next(f.parameters()))
        d = ll.lie_derivative(lambda z: f(z).softmax(-1), x, groups)
    return d.abs().flatten(2).mean(-1)


# --- each model through each public function --------------------------------------------------

def check_lee(model: nn.Module, twin: nn.Module, x: torch.Tensor, case: Case) -> float:
    groups = ["translate_x", "rotate"]
    with contract(model, case):
        table = ll.lee(model, x, groups)
    got = torch.tensor(table["lee"].values, dtype=torch.float64).reshape(len(groups), BATCH)
    return rel(got, lee_of(twin, x, groups).double())


def check_exact(model: nn.Module, twin: nn.Module, x: torch.Tensor, case: Case) -> float:
    with contract(model, case):
        a = ll.attribute(model, x, "rotate", estimator="exact")
    assert a.settings["granularity"] == "node" and a.check == "completeness residual"
    return a.residual


def check_shares(model: nn.Module, twin: nn.Module, x: torch.Tensor, case: Case) -> float:
    with contract(model, case):
        a = ll.attribute(model, x, "rotate", estimator="shares")
    return a.residual


def check_hooks(model: nn.Module, twin: nn.Module, x: torch.Tensor, case: Case) -> float:
    with contract(model, case):
        a = ll.attribute(model, x, "rotate", granularity="module")  # forward hooks, as for untraceable models
    assert a.settings["granularity"] == "module"
    return a.residual


def check_aliasing(model: nn.Module, twin: nn.Module, x: torch.Tensor, case: Case) -> float:
    with contract(model, case):
        table = ll.aliasing(model, x)
    with notes(CAST, all_of=False):
        want = ll.aliasing(twin, x)
    assert list(table["node"]) == list(want["node"]) and table["flagged"].any()
    got, ref = (torch.tensor(t["alias_ratio"].fillna(0).values) for t in (table, want))
    return rel(got, ref)


def check_antialias_then_lee(model: nn.Module, twin: nn.Module, x: torch.Tensor, case: Case) -> float:
    before = snapshot(model)
    with pytest.raises(ll.LayerlieError, match=r"^activations='filtered' needs x= .*images\[:1\]\): Net does not "
                                               r"state its input size$"):
        ll.antialias(model, activations="filtered")
    with notes(*[n for n in case.notes if n != TRAINING]):  # a new model in eval mode, as from trace
        variant = ll.antialias(model, activations="filtered", x=x)
    assert_unchanged(before, model)
    with notes(CAST, all_of=False):
        want = ll.antialias(twin, activations="filtered", x=x)
        got, ref = (ll.lee(m, x, "translate_x")["lee"].values for m in (variant, want))
    assert sorted(variant.meta["layerlie.surgery"]) == ["act1", "act2", "conv2"]  # ReLUs filtered, conv blurred
    return rel(torch.tensor(got), torch.tensor(ref))


def check_ablate(model: nn.Module, twin: nn.Module, x: torch.Tensor, case: Case) -> float:
    with contract(model, case):
        ab = ll.ablate(model, x, variants=["blurpool"], groups=["translate_x"])
    original = float(lee_of(twin, x, ["translate_x"]).mean())
    assert ab.table["lee_translate_x"].iloc[0] == pytest.approx(original, rel=tol(model))
    return float(ab.table["residual"].max())


def check_metrics(model: nn.Module, twin: nn.Module, x: torch.Tensor, case: Case) -> float:
    which = ["consistency", "eq_t", "invariance"]
    with contract(model, case):
        got = ll.metrics(model, x, which)
    with notes(CAST, all_of=False):
        want = ll.metrics(twin, x, which)
    return rel(torch.tensor(got["value"].values), torch.tensor(want["value"].values))


def check_monitor(model: nn.Module, twin: nn.Module, x: torch.Tensor, case: Case) -> float:
    before = snapshot(model)
    with notes(*[n for n in case.notes if n != TRAINING]):  # a monitor measures the live model in eval mode
        mon = ll.Monitor(model, x, ["translate_x"], every=1, layers=True)
        row = mon.measure(0).iloc[0]
    assert_unchanged(before, model)
    assert row["lee"] == pytest.approx(float(lee_of(twin, x, ["translate_x"]).mean()), rel=tol(model))
    return row["share_residual"]


CHECKS = {"lee": check_lee, "attribute_exact": check_exact, "attribute_shares": check_shares,
          "attribute_hooks": check_hooks, "aliasing": check_aliasing, "antialias_then_lee": check_antialias_then_lee, "ablate": check_ablate,
          "metrics": check_metrics, "monitor": check_monitor}
"""Each public function's check on a user's model: a completeness or share-sum residual, or the
relative distance to the same measurement of the eval-mode twin."""


@pytest.mark.parametrize("function", CHECKS)
@pytest.mark.parametrize("name", MODELS)
def test_each_user_model_through_each_function(name, function):
    model, twin, x, case = build(name)
    assert CHECKS[function](model, twin, x, case) <= tol(model)


# --- what the contract says, one rule at a time -----------------------------------------------

def test_a_model_in_training_mode_is_measured_in_eval_mode_and_left_in_training_mode():
    model, twin, x, case = build("trained_cnn")
    running = model.bn1.running_mean.clone()
    with notes(TRAINING):
        a = ll.attribute(model, x, "rotate", granularity="module")  # forward hooks on the copy
    assert a.residual <= tol(model) and torch.equal(model.bn1.running_mean, running)
    assert model.training and model.act1.inplace
    loaded = ll.load_model(model)
    assert loaded is not model and not loaded.training and not loaded.act1.inplace
    assert model.training and model.act1.inplace


def test_output_picks_another_tensor_and_the_rule_is_one_line_errors():
    model, twin, x, case = build("dict")
    features = model(x)["features"]
    assert torch.allclose(ll.trace(model, output="features")(x), features)
    d = ll.lie_derivative(model, x, "translate_x", output="features")
    assert rel(d, ll.lie_derivative(lambda z: model(z)["features"], x, "translate_x")) <= TOL[torch.float32]
    a = ll.attribute(model, x, "translate_x", output="features")  # a key: the features as they are
    assert a.settings["selected"] == "features" and a.settings["output"] == "logits"
    assert a.residual <= TOL[torch.float32] and a.total.shape == features.shape
    tuple_model = build("tuple")[0].eval()
    with notes():  # an explicit index: no note
        assert torch.allclose(ll.trace(tuple_model, output=1)(x), tuple_model(x)[1])
    with pytest.raises(ll.LayerlieError, match=r"^Net returns a dict with keys \['logits', 'features'\], with no "
                                               r"'probs'; pass output= one of its keys that holds the tensor"):
        ll.lee(model, x, output="probs")
    with pytest.raises(ll.LayerlieError, match=r"^output=2 picks an item of a tuple or list, but Net returns a "
                                               r"tuple of 2; pass output= an index below its length"):
        ll.aliasing(tuple_model, x, output=2)
    with pytest.raises(ll.LayerlieError, match=r"^output=0 picks an item of a tuple or list, but Net returns a dict"):
        ll.metrics(model, x, ["consistency"], output=0)


def test_one_channel_images_groups_and_errors():
    model, twin, x, case = build("one_channel")
    model.eval()
    with pytest.raises(ll.LayerlieError, match=r"^the model expects 1 input channel, the images have 3 \(shape "
                                               r"\(2, 3, 32, 32\)\); x.mean\(1, keepdim=True\) gives their luminance$"):
        ll.lee(model, images(3))
    with notes(r"^groups='all' leaves out saturate: a channel group that does not fit images of 1 channel$"):
        table = ll.lee(model, x, "all")
    assert "saturate" not in set(table["group"]) and len(set(table["group"])) == 9
    with pytest.raises(ll.LayerlieError, match=r"^group 'saturate' mixes 3 channels, the images have 1; leave it out"):
        ll.lee(model, x, "rotate,saturate")
    assert input_channels(model) == 1  # from its first convolution


def test_cli_output_picks_the_tensor(capsys, tmp_path, monkeypatch):
    (tmp_path / "tuplenets.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv, self.fc = torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.Linear(4, 3)\n"
        "    def forward(self, x):\n"
        "        features = self.conv(x).relu().mean((2, 3))\n"
        "        return self.fc(features), features\n"
        "def net():\n"
        "    torch.manual_seed(0)\n"
        "    return Net()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import tuplenets

    model = tuplenets.net().eval()
    x = ll.photos(model, n=1)
    for flags, output, said in [((), 0, "layerlie: note: Net returns a tuple of 2: measuring its first tensor "
                                         "(output=0); pass output= another index to pick another\n"),
                                (("--output", "1"), 1, "")]:
        code = main(["e2e", "tuplenets:net", "--n", "1", "--groups", "rotate", "--json", *flags])
        out, err = capsys.readouterr()
        want = float(lee_of(ll.trace(model, output=output), x, ["rotate"]).mean())
        assert code == 0 and err == said
        assert json.loads(out)["groups"]["rotate"]["mean"] == pytest.approx(want, rel=TOL[torch.float32])
    code = main(["layers", "tuplenets:net", "--n", "1", "--group", "rotate", "--output", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and err == "" and json.loads(out)["residual"] <= TOL[torch.float32]
    code = main(["e2e", "tuplenets:net", "--n", "1", "--output", "logits"])
    out, err = capsys.readouterr()
    assert code == 2 and err == ("layerlie: error: model 'tuplenets:net': Net returns a tuple of 2, with no 'logits'; "
                                 "pass output= an index that holds the tensor to measure\n")
