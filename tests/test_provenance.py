"""Where the weights came from (docs/design.md §4): a report and a sweep of what a user holds (a module,
a checkpoint, pretrained weights, a callable) say it in every row, the manifest, the HTML and
every figure title, and a spec's model tables are checked before anything runs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from html.parser import HTMLParser

import pytest
import timm
import torch
from conftest import cache_weights
from safetensors.torch import save_file

import layerlie as ll
from layerlie.views import figures
from layerlie.results import store as st
from layerlie.cli import main
from layerlie.results.sweep import SpecError, read_spec, run_task, tasks
from layerlie.testing import Tiny


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def text_of(page) -> str:
    """The page's text as a reader sees it, tags and escapes undone."""
    class Text(HTMLParser):
        parts: list[str] = []

        def handle_data(self, data):
            self.parts.append(data)

    parser = Text()
    parser.parts = []
    parser.feed(page.read_text())
    return " ".join(parser.parts)


@pytest.fixture
def drawn(monkeypatch):
    """The figures the report draws, by name, as the figure functions return them."""
    seen: dict = {}
    real = figures.for_store

    def recorded(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.update({k: v for k, v in out.items() if not isinstance(v, str)})
        return out

    monkeypatch.setattr(figures, "for_store", recorded)
    return seen


def titles(figs: dict) -> dict[str, str]:
    """Each figure's titles, every axes' together."""
    return {name: " ".join(ax.get_title() for ax in fig.axes) for name, fig in figs.items()}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """Trained-looking weights of resnet10t: not those of a seeded random init."""
    torch.manual_seed(7)
    model = timm.create_model("resnet10t")
    params = dict(model.named_parameters())
    state = {k: v + 0.05 * torch.randn_like(v) if k in params else v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("w") / "trained.safetensors"
    save_file(state, path)
    return path


# --- report -------------------------------------------------------------------------------

@pytest.mark.slow
def test_report_on_a_checkpoint_names_it_and_its_hash_everywhere(weights_file, drawn, tmp_path):
    out = ll.report("resnet10t", path=tmp_path / "r.html", checkpoint=weights_file, n=1, size=32,
                    store=tmp_path / "store")
    digest = sha256(weights_file)
    text = text_of(out)
    assert f"checkpoint ({weights_file}, sha256 {digest})" in text and "random init" not in text
    assert len(drawn) == 6, sorted(drawn)
    for name, title in titles(drawn).items():
        assert f"checkpoint (trained.safetensors, sha256 {digest[:12]})" in title, name
    e2e = ll.load(tmp_path / "store", "e2e")
    assert (e2e["weights"] == f"checkpoint ({weights_file}, sha256 {digest})").all()
    # the end-to-end table holds every group measured, by default every group there is
    shown = re.search(r"End-to-end LEE per group.*?</table>", out.read_text(), flags=re.S).group(0)
    assert set(re.findall(r"<tr>\s*<td>(\w+)</td>", shown)) == set(e2e["group"]) == {
        g.name for g in ll.resolve_groups("all")}
    torch.manual_seed(0)
    assert not torch.equal(ll.load_model("resnet10t", checkpoint=weights_file).fc.weight,
                           ll.load_model("resnet10t").fc.weight)  # the weights measured were not the seed's


def test_report_on_a_callable_says_callable_everywhere(drawn, tmp_path):
    out = ll.report("usernets:tiny", path=tmp_path / "r.html", groups="translate_x", n=1, size=32)
    assert "callable usernets:tiny" in text_of(out) and "random init" not in text_of(out)
    assert len(drawn) == 6
    for name, title in titles(drawn).items():
        assert "callable usernets:tiny" in title, name


def test_report_on_a_module_says_it_was_given_and_takes_images(drawn, tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    x = ll.photos(model, n=2, size=32)
    out = ll.report(model, x, path=tmp_path / "r.html", groups="translate_x")
    text = text_of(out)
    assert "layerlie report: Tiny" in text and "module Tiny (given)" in text
    assert "tensor (2, 3, 32, 32) float32 (sha256" in text  # the images setting: the tensor given
    assert all("module Tiny (given)" in t for t in titles(drawn).values())
    assert "Sequential" not in text and "kernel_size" not in text  # never the module's repr


def test_report_on_a_module_with_a_checkpoint_names_the_checkpoint(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "tiny.pth"
    torch.save(Tiny().state_dict(), path)
    out = ll.report(Tiny(), path=tmp_path / "r.html", checkpoint=path, groups="translate_x", n=1, size=32)
    assert f"checkpoint ({path}, sha256 {sha256(path)})" in text_of(out)
    assert "module Tiny (given)" not in text_of(out)


def test_report_refuses_a_path_in_the_place_of_images(tmp_path):
    with pytest.raises(ll.LayerlieError, match=r"x is an image batch .* pass the HTML file as path="):
        ll.report("usernets:tiny", tmp_path / "r.html")


def test_cli_report_takes_checkpoint_and_size(tmp_path, capsys):
    path, out = tmp_path / "tiny.pth", tmp_path / "r.html"
    torch.save(Tiny().state_dict(), path)
    assert main(["report", "usernets:tiny", "--checkpoint", str(path), "--groups", "translate_x", "--n", "1",
                 "--size", "32", "--out", str(out), "--store", str(tmp_path / "s")]) == 0
    assert f"checkpoint ({path}, sha256 {sha256(path)})" in text_of(out)
    assert st.manifest(tmp_path / "s")["spec"]["size"] == 32
    assert set(ll.load(tmp_path / "s", "e2e")["group"]) == {"translate_x"}


# --- sweep --------------------------------------------------------------------------------

@pytest.mark.slow
def test_sweep_of_model_tables_records_each_models_weights(weights_file, tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text(f'models = [{{ name = "resnet10t", checkpoint = "{weights_file}" }},\n'
                    '          { callable = "usernets:tiny" }, "resnet10t"]\n'
                    'groups = ["translate_x"]\nmeasures = ["e2e", "layers"]\nn = 1\nsize = 32\nseed = 3\n')
    store = tmp_path / "store"
    assert main(["sweep", str(spec), "--store", str(store), "--workers", "0"]) == 0
    digest = sha256(weights_file)
    expected = {"resnet10t (trained.safetensors)": f"checkpoint ({weights_file}, sha256 {digest})",
                "usernets:tiny": "callable usernets:tiny", "resnet10t": "random init (seed 3)"}
    assert st.manifest(store)["weights"] == expected
    tables = {t: ll.load(store, t) for t in st.TABLES}
    for name in ("e2e", "layers"):
        rows = tables[name]
        assert dict(zip(rows["model"], rows["weights"])) == expected
        assert set(rows["host"]) == {socket.gethostname()} and set(rows["pid"]) == {os.getpid()}
    short = {"resnet10t (trained.safetensors)": f"checkpoint (trained.safetensors, sha256 {digest[:12]})",
             "usernets:tiny": "callable usernets:tiny", "resnet10t": "random init (seed 3)"}
    for model, said in short.items():
        drawn = {k: v for k, v in figures.for_store(tables, st.manifest(store)["spec"], model=model).items()
                 if not isinstance(v, str)}
        assert {"depth", "by_type", "e2e_groups", "top_layers"} <= set(drawn)
        for name, title in titles(drawn).items():
            assert said in title, (model, name)
    # the three models' figure says each source of weights
    together = titles({"e2e": figures.e2e_groups(tables["e2e"])})["e2e"]
    assert "checkpoint x1" in together and "callable x1" in together and "random init x1" in together


def test_pretrained_in_a_spec_comes_from_the_cache_and_is_named_by_its_tag(offline, no_network, tmp_path):
    cfg = timm.models.get_pretrained_cfg("test_resnet")
    torch.manual_seed(1)
    model = timm.create_model("test_resnet")
    params = dict(model.named_parameters())
    state = {k: v + 0.05 * torch.randn_like(v) if k in params else v for k, v in model.state_dict().items()}
    cache_weights(offline / "hf", cfg.hf_hub_id, state)
    spec = read_spec({"models": [{"name": "test_resnet", "pretrained": True}], "groups": ["translate_x"],
                      "n": 1, "size": 32})
    task = tasks(spec)[0]
    assert task.model == f"test_resnet.{cfg.tag}"
    _, table = run_task(task, spec)
    assert set(table["weights"]) == {f"pretrained (timm test_resnet.{cfg.tag})"}
    assert not no_network, "cached weights need no network"


def test_a_checkpoint_changed_after_the_check_fails_its_task(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(Tiny().state_dict(), path)
    spec = read_spec({"models": [{"callable": "usernets:tiny", "checkpoint": str(path)}],
                      "groups": ["translate_x"], "n": 1, "size": 32})
    torch.save({k: v + 1 for k, v in Tiny().state_dict().items()}, path)
    with pytest.raises(ll.LayerlieError, match="changed after the sweep began .* --force-new"):
        run_task(tasks(spec)[0], spec)


def test_a_store_of_other_weights_is_a_different_spec(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(Tiny().state_dict(), path)
    spec = {"models": [{"callable": "usernets:tiny", "checkpoint": str(path)}], "groups": ["translate_x"], "n": 1,
            "size": 32}
    assert not ll.sweep(spec, tmp_path / "s", workers=0, progress=False).failed
    torch.save({k: v + 1 for k, v in Tiny().state_dict().items()}, path)
    with pytest.raises(SpecError, match=r"differs in: models"):
        ll.sweep(spec, tmp_path / "s", workers=0, progress=False, resume=True)


@pytest.mark.parametrize("entry, message", [
    ({"name": "resnet10t", "pretrianed": True}, "unknown key 'pretrianed'"),
    ({"name": "resnet10t", "callable": "usernets:tiny"}, "got name and callable"),
    ({"pretrained": True}, "got no model"),
    ({"name": "resnet_10t"}, "name = 'resnet_10t' is not a timm model"),
    ({"callable": "usernets:tiny", "pretrained": True}, "pretrained = true takes timm's weights for a timm name"),
    ({"name": "resnet10t", "pretrained": "yes"}, "pretrained = expects true or false, got 'yes'"),
    ({"name": "resnet10t", "checkpoint": "/nonexistent/w.pth"}, "checkpoint '/nonexistent/w.pth' does not exist"),
    ({"name": torch.nn.Conv2d(3, 3, 1)}, "name = a Conv2d module is not a timm model"),
    ({"module": "Tiny"}, "module = expects a torch.nn.Module, got 'Tiny'"),
    ({"name": "resnet10t", "label": ""}, "label = expects a non-empty string"),
])
def test_bad_model_tables_are_one_line_errors_before_anything_runs(tmp_path, entry, message):
    with pytest.raises(SpecError, match=re.escape(message)) as info:
        ll.sweep({"models": [entry], "groups": ["translate_x"]}, tmp_path / "s", workers=0)
    assert "\n" not in str(info.value) and "kernel_size" not in str(info.value)
    assert not (tmp_path / "s").exists()


def test_corrupt_checkpoints_and_twice_used_labels_are_refused(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(SpecError, match=r"spec key 'models': checkpoint .*bad.safetensors' is corrupt"):
        read_spec({"models": [{"name": "resnet10t", "checkpoint": str(tmp_path / "bad.safetensors")}]})
    with pytest.raises(SpecError, match="two models are labelled 'resnet10t'; give one a label"):
        read_spec({"models": ["resnet10t", {"name": "resnet10t", "label": "resnet10t"}]})


def test_pretrained_in_a_spec_without_network_names_checkpoint(offline, tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('models = [{ name = "resnet18", pretrained = true }]\ngroups = ["translate_x"]\n')
    assert main(["sweep", str(spec), "--store", str(tmp_path / "s"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "spec key 'models': cannot download pretrained weights for 'resnet18'" in err
    assert "checkpoint=FILE" in err and not (tmp_path / "s").exists()


def test_manifest_records_weights_and_the_writing_process(tmp_path):
    root = st.create(tmp_path / "s", {"models": ["a"]}, weights={"a": "random init (seed 0)"})
    data = json.loads((root / "manifest.json").read_text())
    assert data["weights"] == {"a": "random init (seed 0)"}
    assert data["machine"]["host"] == socket.gethostname() and data["machine"]["pid"] == os.getpid()
