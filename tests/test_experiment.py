"""The learned-equivariance experiment as a user runs it: fixed disjoint splits, augmentations
that keep the content inside, models that learn, the relative LEE against finite differences,
the claims on known numbers, and the command end to end with resume."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from layerlie.results import store as st
from layerlie.cli import main
from layerlie.experiments import learned as L
from layerlie.experiments.learned_report import Tables, after_warmup, claims
from layerlie.testing import RTOL

SMALL = ["--tiny", "--datasets", "digits", "--models", "resnet10t,vit_tiny_p6", "--conditions", "none,translate"]
RUNS = [L.run_id("digits", m, c) for m in ("resnet10t", "vit_tiny_p6") for c in ("none", "translate")]
STRATIFIED = 0.01  # each digit's held-out fraction is 20% to within a point
INK_KEPT = 0.03  # an augmented digit keeps its ink to within 3%: it stays on its canvas


# --- data ------------------------------------------------------------------------------------

def test_digit_split_is_fixed_disjoint_and_stratified():
    a, b = L.digits(0), L.digits(0)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.origin_test, b.origin_test)
    train, test = set(a.origin_train[:, 0].tolist()), set(a.origin_test[:, 0].tolist())
    assert not train & test and len(train | test) == 1797
    held = torch.bincount(a.y_test, minlength=10) / torch.bincount(torch.cat([a.y_train, a.y_test]), minlength=10)
    assert torch.allclose(held, torch.full((10,), 0.2), atol=STRATIFIED)
    assert not torch.equal(L.digits(1).origin_test, a.origin_test)  # the seed chooses the split
    assert a.x_train.shape[-2:] == (L.CANVAS, L.CANVAS) and float(a.x_train[..., :8, :].abs().max()) == 0.0


def test_texture_crops_of_train_and_test_never_share_a_pixel():
    split = L.textures(0, train_per_class=20, test_per_class=5)
    crop = split.x_train.shape[-1]
    for photo in range(len(L.TEXTURE_SOURCES)):
        train = split.origin_train[split.origin_train[:, 0] == photo]
        test = split.origin_test[split.origin_test[:, 0] == photo]
        assert len(train) == 20 and len(test) == 5
        assert int(train[:, 2].max()) + crop <= int(test[:, 2].min())  # columns: train left of test
    assert torch.equal(split.y_test, split.origin_test[:, 0])
    again = L.textures(0, train_per_class=20, test_per_class=5)
    assert torch.equal(again.x_train, split.x_train)


@pytest.mark.parametrize("condition", ["translate", "translate_rotate"])
def test_augmentation_keeps_the_digit_on_its_canvas(condition):
    split = L.load_split("digits", 0)
    x = split.x_train[:64]
    warped = L.CONDITIONS[condition](x, split.padding, torch.Generator().manual_seed(0))
    assert not torch.allclose(warped, x)
    # bilinear resampling keeps the ink; a digit pushed over the border would lose some
    torch.testing.assert_close(warped.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=INK_KEPT, atol=0)
    assert L.CONDITIONS["none"](x, split.padding, torch.Generator()) is x


# --- models ----------------------------------------------------------------------------------

def test_antialiased_model_trains_its_own_parameters():
    torch.manual_seed(0)
    plain, blurred = L.MODELS["resnet10t"](1, 10), L.MODELS["resnet10t_blurpool"](1, 10)
    assert blurred.meta["layerlie.surgery"]  # the blurs are in the graph
    assert sum(p.numel() for p in blurred.parameters()) == sum(p.numel() for p in plain.parameters())
    split = L.load_split("digits", 0)
    blurred.train()
    opt = torch.optim.AdamW(blurred.parameters(), lr=1e-3)
    moved = set()
    for _ in range(2):  # the zero-initialised last norm of each block opens its branch after one step
        opt.zero_grad()
        F.cross_entropy(blurred(split.normalize(split.x_train[:8])), split.y_train[:8]).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in blurred.parameters())
        moved |= {name for name, p in blurred.named_parameters() if p.grad.abs().sum() > 0}
        opt.step()
    assert moved == {name for name, _ in blurred.named_parameters()}


@pytest.mark.parametrize("name", list(L.MODELS))
def test_models_fit_a_fixed_batch(name):
    """Each model halves the loss on 32 fixed digits within 30 steps (an easy subset: memorising
    it needs no generalisation; the ViT, the slowest, gets there after about 25)."""
    split = L.load_split("digits", 0)
    torch.manual_seed(0)
    model = L.MODELS[name](1, 10).train()
    x, y = split.normalize(split.x_train[:32]), split.y_train[:32]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --- measures --------------------------------------------------------------------------------

def test_relative_lee_matches_finite_differences():
    """translate_x by t moves content t (W - 1) / 2 pixels (docs/method.md §1); the central-difference
    derivative of a bilinear sub-pixel shift is the central scheme. The ViT has no max-pool,
    whose ties on the digits' flat background would pick one side of the difference."""
    torch.manual_seed(0)
    model = L.MODELS["vit_tiny_p6"](1, 10).double().eval()
    split = L.load_split("digits", 0)
    x = split.normalize(split.x_test[:2]).double()
    got = L.relative_lee(model, x, ("translate_x",), "central")["lee"].to_numpy()

    def centred(v: torch.Tensor) -> torch.Tensor:
        z = model(v)
        return z - z.mean(-1, keepdim=True)

    def shifted(px: float) -> torch.Tensor:
        theta = torch.tensor([[1.0, 0.0, 2 * px / x.shape[-1]], [0.0, 1.0, 0.0]], dtype=x.dtype).expand(len(x), 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    eps = 1e-4
    with torch.no_grad():
        fd = (centred(shifted(eps)) - centred(shifted(-eps))) / (2 * eps) * ((x.shape[-1] - 1) / 2)
        want = (fd.norm(dim=-1) / centred(x).norm(dim=-1)).numpy()
    assert want.min() > 1e-3  # not a degenerate case
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=RTOL["central_difference"], atol=0)


def _known_tables() -> Tables:
    """Hand-made tables: LEE falls in 3 of 4 runs, translation lowers it for one model of two,
    BlurPool lowers it in one condition of two, and accuracy falls as the LEE rises."""
    end = {("resnet10t", "none"): 0.4, ("resnet10t", "translate"): 0.2,
           ("resnet10t_blurpool", "none"): 0.1, ("resnet10t_blurpool", "translate"): 0.3}
    rows, metrics = [], []
    for (m, c), v in end.items():
        for output, group in itertools.product(("softmax", "logits_relative"), ("translate_x", "translate_y")):
            init = 0.2 if (m, c) == ("resnet10t", "translate") else 1.0  # that run stays at 0.2
            rows += [dict(dataset="d", model=m, condition=c, phase="init", group=group, lee=init, scheme="central",
                          output=output, image="0"),
                     dict(dataset="d", model=m, condition=c, phase="end", group=group, lee=v, scheme="central",
                          output=output, image="0")]
        metrics += [dict(dataset="d", model=m, condition=c, phase="init", metric="accuracy", value=0.1),
                    dict(dataset="d", model=m, condition=c, phase="end", metric="accuracy", value=1 - v)]
    return Tables(pd.DataFrame(), pd.DataFrame(rows), pd.DataFrame(), pd.DataFrame(metrics))


def test_claims_on_known_numbers():
    found = {c.name.split()[0]: c for c in claims(_known_tables())}
    trained, augmentation, anti, tracks = (found[k] for k in ("trained", "augmentation", "anti-aliasing", "the"))
    assert (trained.agree, trained.total, trained.verdict) == (3, 4, "holds mostly")
    assert (augmentation.agree, augmentation.total, augmentation.verdict) == (2, 4, "does not hold")
    assert "resnet10t_blurpool translate translate_x" in augmentation.detail
    assert (anti.agree, anti.total, anti.verdict) == (1, 2, "does not hold") and "d/translate" in anti.detail
    assert (tracks.agree, tracks.total, tracks.verdict) == (1, 1, "holds") and "rho -1.00" in tracks.detail


# --- the command -----------------------------------------------------------------------------

def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["experiment", "learned-equivariance", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_experiment_end_to_end_then_resume(capsys, tmp_path):
    store, out = tmp_path / "store", tmp_path / "figures"
    code, text, err = run(capsys, *SMALL, "--store", str(store), "--out", str(out))
    assert code == 0, err
    assert "4 runs ran, 0 skipped" in text
    for name in ("lee_vs_step.png", "shares_by_type.png", "lee_vs_accuracy.png"):
        assert (out / name).stat().st_size > 10_000
    summary = (out / "SUMMARY.md").read_text()
    assert summary.count("| digits |") >= 4 * 3  # runs, finite metrics, shares
    for claim in ("more equivariant than at initialisation", "augmentation lowers", "anti-aliasing lowers",
                  "tracks accuracy"):
        assert summary.count(claim) == 2  # under each output
    assert "not tested" in summary  # this grid holds no BlurPool run to compare
    monitor = st.load(store, "monitor")
    per_run = monitor.groupby("run").size()
    assert set(per_run.index) == set(RUNS) and (per_run == 3 * 3 * 2).all()  # steps 0, 2, 4; groups; schemes
    assert monitor["accuracy"].notna().all() and (monitor["overhead"].dropna() > 0).all()
    e2e = st.load(store, "e2e")
    assert set(e2e["phase"]) == {"init", "end"} and set(e2e["output"]) == {"softmax", "logits_relative"}
    assert (e2e["lee"] > 0).all()
    spec = st.manifest(store)["spec"]
    assert spec["data"]["digits"]["held_out"] == "20% of each class" and spec["config"]["steps"] == 4

    # a run killed before its last part is redone; finished runs are not
    killed = RUNS[1]
    (store / "parts" / f"{killed}.metrics.parquet").unlink()
    (store / "parts" / f".{killed}.metrics.parquet.123.tmp").write_bytes(b"partial")
    kept = {p.name: p.stat().st_mtime_ns for p in (store / "parts").glob("*.parquet") if not p.name.startswith(killed)}
    code, text, err = run(capsys, *SMALL, "--store", str(store), "--out", str(out), "--resume")
    assert code == 0, err
    assert "1 runs ran, 3 skipped" in text and f"{killed}:" in text
    assert kept == {n: (store / "parts" / n).stat().st_mtime_ns for n in kept}
    assert (store / "parts" / f"{killed}.metrics.parquet").exists()
    assert not list((store / "parts").glob("*.tmp"))

    code, _, err = run(capsys, *SMALL, "--store", str(store), "--resume", "--steps", "5")
    assert code == 2 and err.count("\n") == 1
    assert "holds another configuration of the experiment; drop --resume" in err


@pytest.mark.parametrize("args, message", [
    (["--models", "resnet18"], "unknown model 'resnet18'; choose from resnet10t, resnet10t_blurpool, vit_tiny_p6"),
    (["--datasets", "mnist"], "unknown dataset 'mnist'; choose from digits, textures"),
    (["--conditions", ","], "unknown condition '(none given)'"),
])
def test_unknown_names_are_one_line_errors(capsys, tmp_path, args, message):
    code, _, err = run(capsys, "--tiny", "--store", str(tmp_path), *args)
    assert code == 2 and err.count("\n") == 1 and message in err


def test_after_warmup_counts_runs_that_fall_after_the_first_measurement():
    rows = [dict(run=r, step=s, group=g, lee=v, scheme="central")
            for r, values in (("falls", (0.01, 1.0, 0.5)), ("rises", (0.01, 0.2, 0.3)))
            for s, v in zip((0, 50, 100), values) for g in ("translate_x", "rotate")]
    t = Tables(pd.DataFrame(rows), pd.DataFrame(), pd.DataFrame(), pd.DataFrame())
    assert after_warmup(t) == (50, 1, 2)


def test_make_experiment_resumes_and_stays_out_of_make_test():
    recipes: dict[str, str] = {}
    target = None
    for line in (Path(__file__).resolve().parents[1] / "Makefile").read_text().splitlines():
        if re.match(r"^[\w-]+:", line):
            target = line.split(":", 1)[0]
            recipes[target] = ""
        elif line.startswith("\t") and target is not None:
            recipes[target] += line
    assert "experiment learned-equivariance" in recipes["experiment"] and "--resume" in recipes["experiment"]
    assert "experiment" not in recipes["test"] and "pytest" in recipes["test"]
