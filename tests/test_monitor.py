"""The training monitor: it leaves training bit-identical, follows the live weights, and
reports one row per measured step and group (docs/method.md §2, 4, 7)."""

from __future__ import annotations

import math
import time

import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

import layerlie as ll
from layerlie.views import figures
from layerlie.results import store as st
from layerlie.integrations.monitor import untouched
from layerlie.testing import TOL


GROUPS = ["translate_x", "rotate"]
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def small_cnn() -> torch.nn.Module:
    """resnet10t with BatchNorm, in-place ReLU and dropout before the head, at 32 px: the RNG and
    the running statistics both matter to training."""
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=4, drop_rate=0.5)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])


def train(steps: int, monitor: dict | None = None, lr: float = 0.02, device: str = "cpu") -> dict:
    """A few SGD steps with momentum; the monitor (when given its options) runs between the
    backward pass and the optimizer step, where the gradients are live."""
    model = small_cnn().to(device)
    x, y = (t.to(device) for t in batch())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    mon = ll.Monitor(model, x[:2], GROUPS, **monitor) if monitor is not None else None
    model.train()
    for i in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if mon is not None:
            mon.step(i)
        opt.step()
    return dict(model=model, opt=opt, mon=mon, next=torch.rand(3), next_here=torch.rand(3, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_training_is_bit_identical_with_the_monitor(device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # else two plain runs differ on CUDA
    plain = train(3, device=device)
    watched = train(3, dict(every=1, layers=True, metrics=["consistency"]), device=device)
    assert len(watched["mon"].table()) == 3 * len(GROUPS)
    a, b = plain["model"].state_dict(), watched["model"].state_dict()  # weights and BN running statistics
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = plain["opt"].state_dict()["state"], watched["opt"].state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
    assert torch.equal(plain["next"], watched["next"]) and torch.equal(plain["next_here"], watched["next_here"])
    assert all(m.training for m in watched["model"].modules())


def test_untouched_puts_back_what_the_body_changes():
    model = small_cnn().train()
    model(batch()[0]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    stats = {n: b.clone() for n, b in model.named_buffers()}
    model.fc.eval()  # a mixed state must come back as it was
    rng = torch.get_rng_state()
    with untouched(model):
        assert not any(m.training for m in model.modules()) and not torch.is_grad_enabled()
        assert all(p.grad is None for p in model.parameters())
        torch.rand(10)
        for b in model.buffers():
            b.add_(1)
        model.train()
        with torch.enable_grad():
            model(batch()[0]).sum().backward()
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers())
    assert not model.fc.training and model.training and model.conv1[0].training


def test_table_has_one_row_per_measured_step_and_group():
    model = small_cnn()
    x, _ = batch()
    mon = ll.Monitor(model, x[:1], GROUPS, every=2, layers=True)
    assert math.isnan(mon.overhead)
    measured = []
    for i in range(5):
        time.sleep(0.01)  # stands in for a training step
        measured.append(mon.step(i))
    assert measured == [True, False, True, False, True]
    t = mon.table()
    assert list(zip(t.step, t.group)) == [(s, g) for s in (0, 2, 4) for g in GROUPS]
    assert set(t.scheme) == {"central"} and (t.seconds > 0).all()
    assert math.isnan(t.overhead.iloc[0]) and (t.overhead.iloc[2:] > 0).all()
    assert math.isfinite(mon.overhead) and mon.overhead > 0
    shares = t[[f"share_{k}" for k in ll.list_layer_types()]].sum(axis=1)
    # completeness: the types' shares sum to 1 up to the reported check (docs/method.md §4)
    assert ((shares - 1).abs() - t.share_residual).abs().max() < TOL[torch.float32]
    assert (t.share_residual < 1e-3).all()
    mon.measure(2)  # measuring a step again replaces its rows
    assert len(mon.table()) == len(t)


def fresh_agreement(mon: ll.Monitor, model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Measure now, and the largest relative gaps to a fresh ``ll.lee`` and ``ll.attribute`` of the
    model as it is (eval mode): by LEE, and by layer share (absolute below 1e-5)."""
    last = mon.measure(99).set_index("group")
    model.eval()
    direct = ll.lee(model, x, GROUPS).groupby("group")["lee"].mean()
    gaps = {"lee": max(abs(last.lee[g] - direct[g]) / abs(direct[g]) for g in GROUPS), "share": 0.0}
    for g in GROUPS:
        by_type = ll.attribute(model, x, g, estimator="shares").nodes.groupby("layer_type")["share"].sum()
        gaps["share"] = max([gaps["share"], *(abs(last[f"share_{t}"][g] - s) / max(abs(s), 1e-2)
                                                for t, s in by_type.items() if abs(s) > 1e-5)])
    model.train()
    return gaps


def test_measurements_follow_training():
    run = train(4, dict(every=2, layers=True, metrics={"consistency": {}, "eq_t": {"max_shift": 0.25}}), lr=0.05)
    model, mon = run["model"], run["mon"]
    x = batch()[0][:2]
    first = mon.table().set_index(["step", "group"])
    # the LEE runs on the live model, the shares on the monitor's traced copy: both must hold the trained weights
    gaps = fresh_agreement(mon, model, x)
    assert gaps["lee"] < TOL[torch.float32] and gaps["share"] < 1e-3
    last = mon.table().set_index(["step", "group"]).loc[99]
    for g in GROUPS:
        assert last.lee[g] != pytest.approx(first.lee[0, g], rel=1e-2)  # the weights moved
    model.eval()
    want = ll.metrics(model, x, ["consistency", "eq_t"], eq_t={"max_shift": 0.25}).groupby("metric")["value"].mean()
    assert last.eq_t.iloc[0] == pytest.approx(want["eq_t"], rel=TOL[torch.float32])
    assert last.eq_t.iloc[0] != pytest.approx(first.eq_t[0, GROUPS[0]], rel=1e-3)


def test_store_receives_each_measurement(tmp_path):
    st.create(tmp_path, {"experiment": "kept"})
    model = small_cnn()
    mon = ll.Monitor(model, batch()[0][:1], GROUPS, every=1, store=tmp_path, run="a/b")
    mon.step(0)
    mon.step(1)
    stored = ll.load(tmp_path, "monitor")
    pd.testing.assert_frame_equal(stored, mon.table(), check_like=True)
    assert set(stored.run) == {"a/b"} and st.manifest(tmp_path)["spec"] == {"experiment": "kept"}
    fresh = tmp_path / "new"
    ll.Monitor(model, batch()[0][:1], GROUPS, store=fresh, run="r").measure(0)
    assert st.manifest(fresh)["spec"]["monitor"]["groups"] == GROUPS and len(ll.load(fresh, "monitor")) == 2


@pytest.mark.parametrize("probe, match", [
    (torch.randn(3, 32, 32), r"expected images of shape \(B, C, H, W\)"),
    (torch.randn(1, 1, 32, 32), "the model expects 3 input channels"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.int64), "expected floating-point images"),
])
def test_bad_probe_is_refused(probe, match):
    with pytest.raises(ll.LayerlieError, match=match):
        ll.Monitor(small_cnn(), probe, GROUPS)


@pytest.mark.parametrize("options, match", [
    (dict(groups=["translate_x", "twirl"]), "unknown group 'twirl'"),
    (dict(every=0), "every must be a positive integer"),
    (dict(metrics=["eq_q"]), "unknown metric 'eq_q'"),
    (dict(scheme="upwind"), "unknown scheme 'upwind'"),
    (dict(store="out"), "store= needs run="),
    (dict(groups=["stretch_x_published"], layers=True), "compatibility map"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ll.LayerlieError, match=match):
        ll.Monitor(small_cnn(), batch()[0][:1], **{"groups": GROUPS, **options})


def test_figure_draws_lee_and_shares():
    mon = ll.Monitor(small_cnn(), batch()[0][:1], GROUPS, every=1, layers=True)
    mon.measure(0)
    mon.measure(10)
    fig = figures.monitor(mon.table())
    assert isinstance(fig, Figure) and len(fig.axes) == 2 and fig.axes[0].get_yscale() == "log"
    assert len(fig.axes[0].get_lines()) == len(GROUPS)
    fig = figures.monitor(mon.table().drop(columns=[c for c in mon.table() if c.startswith("share_")]))
    assert len(fig.axes) == 1
    with pytest.raises(figures.FigureError, match="has no 'lee' column"):
        figures.monitor(mon.table().drop(columns="lee"))
    two = pd.concat([mon.table().assign(run="a"), mon.table().assign(run="b")])
    with pytest.raises(figures.FigureError, match="several runs"):
        figures.monitor(two)
    assert len(figures.monitor(two, run="b").axes[0].get_lines()) == len(GROUPS)
    with pytest.raises(figures.FigureError, match="run 'c' is not in the monitor table; it holds a, b"):
        figures.monitor(two, run="c")


def test_overhead_leaves_the_one_time_setup_out(monkeypatch):
    """A slow trace and a slow first call of the engine (the memory plan, lazy imports) are the
    set-up: ``setup_seconds`` holds them, the measurements and ``overhead`` do not."""
    from layerlie.integrations import monitor as mod

    slow = 0.5
    calls = []

    replay = mod.replay_lee

    def first_call_slow(*args, **kwargs):
        if not calls:
            time.sleep(slow)
        calls.append(1)
        return replay(*args, **kwargs)

    monkeypatch.setattr(mod, "trace", lambda *a, **k: (time.sleep(slow), ll.trace(*a, **k))[1])
    monkeypatch.setattr(mod, "replay_lee", first_call_slow)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    mon = ll.Monitor(model, torch.randn(1, 3, 16, 16), GROUPS, every=1, metrics=["eq_t"])
    assert mon.setup_seconds >= 2 * slow
    for i in range(3):
        time.sleep(0.02)  # stands in for a training step
        mon.step(i)
    t = mon.table()
    assert (t.seconds < slow).all() and t.attrs["setup_seconds"] == mon.setup_seconds
    steps = t.drop_duplicates("step")
    train = steps.seconds.iloc[-1] / steps.overhead.iloc[-1]  # the mean training step, as the last row saw it
    assert mon.overhead == pytest.approx(steps.seconds.mean() / train)
    assert mon.cost().startswith(f"{mon.overhead:.2f} training steps per measurement")
    assert mon.cost().endswith(f"plus {mon.setup_seconds:.2f} s once (set-up)")


def test_setup_is_made_once(monkeypatch):
    """The trace and the LEE's plan (its footprint and the probe's tangents) are made at
    construction; measurements reuse them, whatever the training does to the weights."""
    from layerlie.integrations import monitor as mod

    made = {"trace": 0, "lee_passes": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            made[name] += 1
            return fn(*args, **kwargs)
        return call

    for name in made:
        monkeypatch.setattr(mod, name, counted(name, getattr(mod, name)))
    run = train(2, dict(every=1, metrics=["consistency"]))
    mon = run["mon"]
    setup = mon.setup
    mon.measure(10)
    assert made == {"trace": 1, "lee_passes": 1} and len(mon.table().step.unique()) == 3
    assert mon.setup is setup and setup.seconds == mon.setup_seconds > 0
    assert len(setup.passes) >= 1 and all(p.tangents.shape[0] == len(p.groups) for p in setup.passes)


@pytest.mark.slow
def test_stale_weights_are_caught(monkeypatch):
    """Injected fault: the traced graph keeps its construction-time weights, and the LEE runs on a
    copy of the model made at construction; the comparison with a fresh measurement catches both."""
    from layerlie.integrations import monitor as mod

    plan = mod.Monitor._plan
    monkeypatch.setattr(mod.Monitor, "_sync", lambda self: None)
    monkeypatch.setattr(mod.Monitor, "_plan", lambda self, selected: plan(self, ll.load_model(selected).eval()))
    run = train(2, dict(every=1, layers=True), lr=0.05)
    gaps = fresh_agreement(run["mon"], run["model"], batch()[0][:2])
    assert gaps["lee"] > 1e-2 and gaps["share"] > 1e-2
