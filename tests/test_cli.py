"""The command line as a user meets it: argument errors, pretrained weights without network,
files written only when asked, custom groups, and one-line errors for expected failures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from conftest import cache_weights

import layerlie as ll
from layerlie.cli import main
from layerlie.core.groups import load_groups, parse_group
from layerlie.testing import TOL

TILT = [[0, 0.5, 0], [0, 0, 0]]
TILT_TEXT = "affine:tilt=0,0.5,0;0,0,0"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --- argument errors ----------------------------------------------------------------------

@pytest.mark.parametrize("args, usage, message", [
    ([], "layerlie [options] COMMAND", "give a command: models, e2e"),
    (["fit", "resnet18"], "layerlie [options] COMMAND", "invalid choice: 'fit'"),
    (["models", "resnet*", "vit*"], "layerlie models [options] [PATTERN]", "unexpected argument 'vit*'"),
    (["e2e"], "layerlie e2e [options] MODEL", "give the MODEL, e.g. layerlie e2e resnet18"),
    (["e2e", "resnet18", "--grups", "rotate"], "layerlie e2e [options] MODEL", "did you mean --groups?"),
    (["layers", "resnet18", "--top", "many"], "layerlie layers [options] MODEL", "--top: must be a whole number"),
    (["aliasing", "--all"], "layerlie aliasing [options] MODEL", "give the MODEL"),
    (["ablate", "resnet18", "--n", "0"], "layerlie ablate [options] MODEL", "--n: must be 1 or more"),
    (["ablate", "resnet18", "--scheme", "upwind"], "layerlie ablate [options] MODEL", "choose from 'central'"),
])
def test_argument_errors_are_three_lines(capsys, args, usage, message):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    command = usage.split(" [options]")[0]
    assert exit_info.value.code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 3, err
    assert lines[0] == f"usage: {usage}"
    assert lines[1].startswith(f"{command}: error: ") and message in lines[1]
    assert lines[2] == f"see {command} --help"


# --- pretrained weights -------------------------------------------------------------------

def test_pretrained_without_network_fails_fast_in_one_line(capsys, offline):
    start = time.perf_counter()
    with pytest.raises(ll.LayerlieError, match=r"'resnet18' \(no network to 127.0.0.1\): .*checkpoint=FILE"):
        ll.load_model("resnet18", pretrained=True)
    assert time.perf_counter() - start < 5
    start = time.perf_counter()
    code, out, err = run_cli(capsys, "e2e", "resnet18", "--pretrained", "--n", "1")
    assert time.perf_counter() - start < 5
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--checkpoint FILE" in err


def test_pretrained_offline_mode_does_not_wait(offline, no_network, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ll.LayerlieError, match=r"\(HF_HUB_OFFLINE is set\): .*checkpoint=FILE"):
        ll.load_model("resnet18", pretrained=True)
    assert not no_network, "offline mode must not connect"


def test_pretrained_weights_come_from_the_local_cache_without_network(offline, no_network):
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in timm.create_model("test_resnet").state_dict().items()}
    cache_weights(offline / "hf", timm.models.get_pretrained_cfg("test_resnet").hf_hub_id, state)
    model = ll.load_model("test_resnet", pretrained=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not model.training
    assert not no_network, "cached weights need no network"


def test_console_script_fails_without_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path), HF_HOME=str(tmp_path), TORCH_HOME=str(tmp_path),
               HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(Path(__file__).parents[1]))
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run([sys.executable, "-m", "layerlie.cli", "e2e", "resnet18", "--pretrained", "--n", "1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "--checkpoint FILE" in done.stderr, done.stderr


# --- files only when asked ----------------------------------------------------------------

def test_figures_only_when_asked_and_custom_groups_in_ablate(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["ablate", "test_resnet", "--n", "1", "--variants", "blurpool", "--groups", f"{TILT_TEXT},rotate"]
    code, out, _ = run_cli(capsys, *args, "--json")
    assert code == 0 and list(tmp_path.iterdir()) == []
    rows = json.loads(out)["variants"]
    assert rows[0]["lee_tilt"] > 0 and rows[1]["factor_tilt"] > 0
    code, out, _ = run_cli(capsys, *args, "--plot", "ab.png")
    assert code == 0 and [p.name for p in tmp_path.iterdir()] == ["ab.png"] and "wrote ab.png" in out


# --- custom groups ------------------------------------------------------------------------

def test_custom_groups_from_the_cli_match_the_python_api(capsys, tmp_path):
    (tmp_path / "groups.toml").write_text("[groups.tilt_file]\naffine = [[0, 0.5, 0], [0, 0, 0]]\n"
                                          "[groups.warm]\nchannel = [[1, 0, 0], [0, 0, 0], [0, 0, -1]]\n")
    code, out, _ = run_cli(capsys, "e2e", "test_resnet", "--n", "1", "--json", "--groups",
                           f"translate_x,affine:tx=0,0,1;0,0,0,{TILT_TEXT},{tmp_path / 'groups.toml'}")
    assert code == 0
    means = {g: r["mean"] for g, r in json.loads(out)["groups"].items()}
    assert list(means) == ["translate_x", "tx", "tilt", "tilt_file", "warm"] and means["warm"] > 0
    assert means["tx"] == means["translate_x"] and means["tilt_file"] == means["tilt"]
    torch.manual_seed(0)  # the CLI's default --init-seed
    model = ll.load_model("test_resnet")
    api = ll.lee(model, ll.photos(model, n=1), ll.Group.affine("tilt", TILT))["lee"].item()
    assert means["tilt"] > 0
    assert abs(means["tilt"] - api) <= TOL[torch.float32] * api


def test_json_is_strict_with_one_image(capsys):
    code, out, _ = run_cli(capsys, "e2e", "test_resnet", "--n", "1", "--groups", "translate_x", "--json")

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    summary = json.loads(out, parse_constant=refuse)
    assert code == 0 and summary["groups"]["translate_x"]["std"] is None


def test_layers_takes_a_custom_group(capsys):
    code, out, _ = run_cli(capsys, "layers", "test_resnet", "--n", "1", "--group", TILT_TEXT, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["lf_norm"] > 0 and summary["residual"] < TOL[torch.float32]


def test_group_text_builds_through_group_affine():
    g = parse_group(TILT_TEXT)
    assert g.name == "tilt" and g.kind == "affine" and torch.equal(g.generator, ll.Group.affine("t", TILT).generator)
    assert parse_group("rotate") is ll.group("rotate") and ll.group(TILT_TEXT).name == "tilt"
    c = parse_group("channel:warm=1,0,0;0,0,0;0,0,-1")
    assert c.kind == "channel" and c.generator.shape == (3, 3)
    names = [g.name for g in ll.resolve_groups(f"all,{TILT_TEXT},rotate")]
    assert names == [g.name for g in ll.resolve_groups("all")] + ["tilt"]
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    d = ll.lie_derivative(lambda z: z.pow(2).mean((2, 3)), x, TILT_TEXT)  # one group: not stacked
    assert d.shape == (1, 3) and torch.equal(d, ll.lie_derivative(lambda z: z.pow(2).mean((2, 3)), x,
                                                                   ll.Group.affine("tilt", TILT)))


@pytest.mark.parametrize("spec, message", [
    ("affine:tilt=0,0.5;0,0,0", r"rows of \[2, 3\] numbers; write a custom group as 'affine:NAME=a,b,c;d,e,f'"),
    ("affine:tilt=0,0.5,0", r"rows of \[3\] numbers"),
    ("affine:tilt=0,half,0;0,0,0", r"'affine:tilt=0': rows of \[1\] numbers"),
    ("affine:tilt", "cannot read group 'affine:tilt': write a custom group as"),
    ("affine:2d=0,0,1;0,0,0", "the name '2d' must start with a letter"),
    ("affine:t=nan,0,0;0,0,0", "NaN or inf"),
    ("channel:c=1,0;0", r"rows of \[2, 1\] numbers"),
    ("channel:c=1,0,0;0,1,0", "square C x C"),
    ("affine:rotate=0,0,1;0,0,0,rotate", "two different groups are named 'rotate'"),
    ("spin", "unknown group 'spin'; valid groups: .*or write a custom group as"),
    ("missing.toml", "cannot read groups file 'missing.toml'"),
])
def test_malformed_groups_are_one_line_errors(capsys, spec, message):
    with pytest.raises(ll.LayerlieError, match=message):
        ll.resolve_groups(spec)
    code, _, err = run_cli(capsys, "e2e", "test_resnet", "--groups", spec)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("text, message", [
    ("[groups.tilt\naffine = 1", "is not valid TOML"),
    ("[groups.tilt]\nrows = [[0, 1, 0], [0, 0, 0]]\n", "group 'tilt': write each group as"),
    ("[groups.tilt]\naffine = [[0, 1], [0, 0]]\n", "an affine generator is 2x3"),
    ("[tilt]\naffine = [[0, 1, 0], [0, 0, 0]]\n", r"defines no \[groups.NAME\] tables only"),
])
def test_malformed_group_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "groups.toml"
    path.write_text(text)
    with pytest.raises(ll.LayerlieError, match=message) as info:
        load_groups(path)
    assert "\n" not in str(info.value)


# --- other expected errors ----------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["e2e", "test_resnet", "--device", "tpu9"], "device 'tpu9' is not usable here.*pass cpu"),
    (["e2e", "test_resnet", "--device", "cuda:7"], "device 'cuda:7' is not usable here.*pass cpu"),
    (["e2e", "test_resnet.no_such_tag", "--pretrained"], r"list them with timm.list_pretrained\('test_resnet.\*'\)"),
    (["e2e", "test_resnet", "--images", __file__], "images folder .* does not exist; give a folder"),
])
def test_expected_errors_are_one_line(capsys, args, message):
    if "cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert re.search(message, err), err


def test_a_model_for_other_inputs_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    (tmp_path / "graynets.py").write_text(
        "import torch\n"
        "def gray():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())\n"
        "def four():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run_cli(capsys, "e2e", "graynets:gray", "--n", "1", "--groups", "translate_x")
    assert code == 0 and "translate_x" in out, err  # its first layer takes one channel: luminance photos
    code, out, err = run_cli(capsys, "e2e", "graynets:four", "--n", "1")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "1 (luminance) or 3 (RGB) channels, not the 4 that Sequential takes" in err
