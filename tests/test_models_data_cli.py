"""Loading models and images, and the CLI end to end, bad input included."""

from __future__ import annotations

import json
import os
import stat
import sys

import pandas as pd
import pytest
import torch
import usernets
from PIL import Image
from safetensors.torch import save_file

import layerlie as ll
from layerlie.cli import main
from layerlie.model.data import photo_paths
from layerlie.results.store import failures
from layerlie.testing import timm_model

FAMILIES = ["resnet18", "vit_tiny_patch16_224", "convnext_atto"]


# --- models -------------------------------------------------------------------------------

def test_unknown_model_suggests_close_names():
    with pytest.raises(ll.LayerlieError, match="did you mean resnet18"):
        ll.load_model("resnet_18")


def test_checkpoints_round_trip(tmp_path):
    model = ll.load_model("resnet18", num_classes=7)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = ll.load_model("resnet18", num_classes=7, checkpoint=tmp_path / name)
        assert torch.equal(loaded.fc.weight, state["fc.weight"])
        assert not loaded.training


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ll.LayerlieError, match="does not exist"):
        ll.load_model("resnet18", checkpoint=tmp_path / "missing.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ll.LayerlieError, match="corrupt"):
        ll.load_model("resnet18", checkpoint=tmp_path / "bad.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ll.LayerlieError, match="corrupt"):
        ll.load_model("resnet18", checkpoint=tmp_path / "bad.safetensors")
    torch.save(ll.load_model("resnet18", num_classes=3).state_dict(), tmp_path / "three.pth")
    with pytest.raises(ll.LayerlieError, match="does not fit.*num_classes"):
        ll.load_model("resnet18", checkpoint=tmp_path / "three.pth")
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "partial.pth")
    with pytest.raises(ll.LayerlieError, match="missing keys"):
        ll.load_model("resnet18", checkpoint=tmp_path / "partial.pth")


def test_callable_spec_and_modules(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "import torch\n"
        "def tiny():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(inplace=True),\n"
        "                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = ll.load_model("mynets:tiny")
    assert not model[1].inplace and not model.training
    with pytest.raises(ll.LayerlieError, match="cannot import"):
        ll.load_model("mynets:nothing")
    assert ll.load_model(model) is model


def test_models_follow_device_and_dtype():
    model = ll.load_model("resnet18", dtype=torch.float64)
    x = ll.photos(model, n=1)
    assert x.dtype == torch.float64
    table = ll.lee(model, x, "translate_x")
    assert table["lee"].notna().all()


# --- images -------------------------------------------------------------------------------

def test_photos_are_real_and_prepared_with_the_data_config():
    model = timm_model("vit_tiny_patch16_224")
    batch = ll.photo_batch(model, n=12)
    assert batch.x.shape == (12, 3, 224, 224)
    assert batch.names[0] == "astronaut" and len(set(batch.names)) == 12
    assert 0.3 < float(batch.x.std()) < 3  # normalized, not constant
    with pytest.raises(ll.LayerlieError, match="between 1 and 12"):
        ll.photos(model, n=13)


def _write_images(folder, labelled: bool):
    rng = torch.Generator().manual_seed(0)
    for i in range(4):
        sub = folder / (f"class{i % 2}" if labelled else "")
        sub.mkdir(parents=True, exist_ok=True)
        arr = (torch.rand(40, 50, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(sub / f"img{i}.png")


def test_image_folders_with_labels_and_unreadable_files(tmp_path):
    model = timm_model("resnet18")
    _write_images(tmp_path / "flat", labelled=False)
    flat = ll.images(tmp_path / "flat", model)
    assert flat.x.shape == (4, 3, 224, 224) and flat.labels is None
    _write_images(tmp_path / "lab", labelled=True)
    (tmp_path / "lab" / "class0" / "broken.jpg").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        lab = ll.images(tmp_path / "lab", model)
    assert lab.labels == ["class0", "class0", "class1", "class1"] and len(lab.names) == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(ll.LayerlieError, match="no images in"):
        ll.images(tmp_path / "empty", model)


# --- CLI ----------------------------------------------------------------------------------

def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_models(capsys):
    code, out, _ = run_cli(capsys, "models", "convnext_at*", "--json")
    assert code == 0 and "convnext_atto" in json.loads(out)
    code, _, err = run_cli(capsys, "models", "no_such_net*")
    assert code == 2 and err.startswith("layerlie: error: no timm model")


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_cli_e2e_on_three_families(capsys, tmp_path, name):
    out_file = tmp_path / "lee.parquet"
    code, out, _ = run_cli(capsys, "e2e", name, "--n", "2", "--groups", "translate_x,rotate,saturate",
                           "--out", str(out_file))
    assert code == 0 and "translate_x" in out and "end-to-end LEE" in out
    table = pd.read_parquet(out_file)
    assert set(table.columns) >= {"model", "image", "group", "lee", "scheme"} and len(table) == 6
    code, out, _ = run_cli(capsys, "e2e", name, "--n", "1", "--groups", "scale", "--json", "--scheme", "spectral")
    summary = json.loads(out)
    assert code == 0 and summary["model"] == name and "scale" in summary["groups"]


def test_cli_e2e_all_groups_csv_and_images_folder(capsys, tmp_path):
    _write_images(tmp_path / "imgs", labelled=True)
    code, out, _ = run_cli(capsys, "e2e", "resnet18", "--images", str(tmp_path / "imgs"), "--n", "2",
                           "--out", str(tmp_path / "lee.csv"))
    assert code == 0
    table = pd.read_csv(tmp_path / "lee.csv")
    assert sorted(table["group"].unique()) == sorted(g.name for g in ll.resolve_groups("all"))


@pytest.mark.parametrize("args, message", [
    (["e2e", "resnet_18"], "unknown model 'resnet_18'; did you mean"),
    (["e2e", "resnet18", "--groups", "spin"], "unknown group 'spin'; valid groups"),
    (["e2e", "resnet18", "--checkpoint", "/nonexistent/w.pth"], "does not exist"),
    (["e2e", "resnet18", "--images", "/nonexistent"], "does not exist"),
    (["e2e", "resnet18", "--out", "table.txt"], "use a .csv or .parquet"),
])
def test_cli_errors_are_one_line(capsys, args, message):
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_rejects_bad_n_and_unwritable_out(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["e2e", "resnet18", "--n", "0"])
    assert exit_info.value.code == 2
    assert "must be 1 or more" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root writes anywhere: a path under a file fails for everyone
        target = tmp_path / "file" / "out.csv"
        (tmp_path / "file").write_text("")
    else:
        target = locked / "out.csv"
    code, _, err = run_cli(capsys, "e2e", "resnet18", "--out", str(target))
    assert code == 2 and "cannot write --out" in err


def test_cli_empty_images_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "e2e", "resnet18", "--images", str(tmp_path))
    assert code == 2 and "no images in" in err


def test_console_script_is_installed():
    bin_dir = os.path.dirname(sys.executable)
    assert os.path.exists(os.path.join(bin_dir, "layerlie"))


@pytest.mark.slow
@pytest.mark.parametrize("name, estimator", [("resnet18", "exact"), ("vit_tiny_patch16_224", "shares"),
                                             ("convnext_atto", "shares")])
def test_cli_layers_on_three_families(capsys, tmp_path, name, estimator):
    code, out, _ = run_cli(capsys, "layers", name, "--group", "rotate", "--estimator", estimator, "--n", "1",
                           "--out", str(tmp_path / "layers.csv"), "--plot", str(tmp_path / "layers.png"))
    check = ll.get_estimator(estimator).check  # printed by its name: the completeness or the share-sum residual
    assert code == 0 and f"{check} (relative):" in out and "by layer type" in out
    table = pd.read_csv(tmp_path / "layers.csv")
    assert {"node", "layer_type", "layout", "local_norm", "contribution_norm", "share", "alias_ratio",
            "flagged"} <= set(table.columns)
    assert table["flagged"].any() and "flagged" in out
    assert (tmp_path / "layers.png").stat().st_size > 1000
    residual = float(out.split(f"{check} (relative):")[1].split()[0])
    assert residual <= 1e-4


def test_cli_layers_errors(capsys):
    code, _, err = run_cli(capsys, "layers", "resnet18", "--group", "spin", "--n", "1")
    assert code == 2 and "unknown group 'spin'" in err
    code, _, err = run_cli(capsys, "layers", "resnet18", "--output", "nowhere", "--n", "1")
    assert code == 2 and "is not a node" in err


def test_cli_aliasing_lists_flagged_nodes(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "aliasing", "resnet18", "--n", "1", "--out", str(tmp_path / "alias.csv"))
    assert code == 0 and "layer3_0_conv1" in out and "downsampling" in out
    table = pd.read_csv(tmp_path / "alias.csv")
    assert set(table["alias_kind"]) == {"nonlinearity", "downsampling"}
    code, out, _ = run_cli(capsys, "aliasing", "resnet18", "--n", "1", "--json")
    summary = json.loads(out)
    assert summary["flagged"] and summary["measured"] == len(table)


def test_cli_untraceable_model_is_a_one_line_note(capsys):
    code, out, err = run_cli(capsys, "layers", "test_attribution:BranchyNet", "--n", "1", "--group", "rotate")
    assert code == 0 and "forward hooks" in err and err.strip().count("\n") == 0
    assert "completeness residual (relative):" in out


# --- image size and channels ---------------------------------------------------------------

def test_photos_take_a_size_square_or_not():
    model = timm_model("resnet18")
    assert ll.photos(model, n=2, size=40).shape == (2, 3, 40, 40)
    assert ll.photo_batch(model, n=1, size=(32, 48)).x.shape == (1, 3, 32, 48)
    assert ll.images(photo_paths()[0].parent, model, n=1, size=24).x.shape == (1, 3, 24, 24)
    for bad in (0, (32,), (32, 0), 2.5):
        with pytest.raises(ll.LayerlieError, match="size must be a positive integer or \\(height, width\\)"):
            ll.photos(model, n=1, size=bad)
    with pytest.raises(ll.LayerlieError, match="images are prepared for a model, given first: got int 2; pass "
                                               "the nn.Module, e.g. photos\\(model, n=4\\)"):
        ll.photos(2, size=64)  # the count where the model goes


def test_a_plain_module_gets_224_and_timms_default_normalisation():
    from timm.data import create_transform

    x = ll.photos(usernets.tiny(), 1)
    with Image.open(photo_paths()[0]) as img:
        reference = create_transform(input_size=(3, 224, 224), is_training=False)(img.convert("RGB"))
    assert x.shape == (1, 3, 224, 224) and torch.equal(x[0], reference)


def test_channels_follow_the_first_layer_and_one_channel_is_luminance():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    gray, rgb = ll.load_model("usernets:gray"), ll.load_model("usernets:tiny")
    x1, x3 = ll.photos(gray, n=2, size=32), ll.photos(rgb, n=2, size=32)
    assert x1.shape == (2, 1, 32, 32) and ll.photos(gray, n=1, size=32, channels=3).shape == (1, 3, 32, 32)
    assert ll.photos(ll.load_model("resnet10t", in_chans=1), 1, size=32).shape == (1, 1, 32, 32)
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    pixels = x3 * std + mean  # back to [0, 1]
    luma = (torch.tensor([0.299, 0.587, 0.114])[:, None, None] * pixels).sum(1, keepdim=True)  # ITU-R 601
    # one channel: the photos' luminance, normalised by the mean of the config's statistics
    assert (x1 * std.mean() + mean.mean() - luma).abs().max() < 3 / 255
    table = ll.lee(gray, x1, "translate_x,rotate")
    assert table["lee"].gt(0).all()
    with pytest.raises(ll.LayerlieError, match="1 \\(luminance\\) or 3 \\(RGB\\) channels, not the 4 that Conv2d "
                                               "takes; pass a tensor of your own images"):
        ll.photos(torch.nn.Conv2d(4, 2, 3), n=1)


@pytest.mark.parametrize("command", ["e2e", "layers", "aliasing", "ablate", "report"])
def test_every_measurement_command_takes_size(capsys, tmp_path, command):
    more = {"e2e": ["--groups", "translate_x"], "ablate": ["--variants", "blurpool", "--groups", "translate_x"],
            "report": ["--groups", "translate_x", "--out", str(tmp_path / "r.html"), "--store", str(tmp_path / "s")]}
    code, _, err = run_cli(capsys, command, "usernets:fixed32", "--n", "1", "--size", "32", *more.get(command, []))
    assert code == 0, err
    if command == "report":
        assert ll.load(tmp_path / "s", "e2e")["lee"].gt(0).all() and not failures(tmp_path / "s")
    else:  # the same model at the photos' own size fails, in one line that names --size
        code, _, err = run_cli(capsys, command, "usernets:fixed32", "--n", "1", *more.get(command, []))
        assert code == 2 and err.count("\n") == 1 and "pass the size it takes with --size" in err


def test_size_takes_height_by_width_and_builds_vits_for_it(capsys, tmp_path):
    code, _, err = run_cli(capsys, "e2e", "usernets:fixed24x32", "--n", "1", "--groups", "translate_x",
                           "--size", "24x32")
    assert code == 0, err
    code, _, err = run_cli(capsys, "e2e", "vit_tiny_patch16_224", "--n", "1", "--groups", "translate_x",
                           "--size", "32", "--out", str(tmp_path / "vit.csv"))
    assert code == 0 and pd.read_csv(tmp_path / "vit.csv")["lee"].gt(0).all(), err
    assert ll.load_model("vit_tiny_patch16_224", size=32).patch_embed.img_size == (32, 32)
    with pytest.raises(SystemExit):
        main(["e2e", "resnet18", "--size", "32x"])
    assert "--size: must be pixels, SIZE or HEIGHTxWIDTH, got '32x'" in capsys.readouterr().err
