"""Sweeps (docs/design.md §4): spec checks, stable tasks, Ray against the serial path, failures, SIGKILL and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch

import layerlie as ll
from layerlie.results import store as st
from layerlie.cli import main
from layerlie.results.spec import SpecError, read_spec
from layerlie.results.sweep import tasks

# 3 small models x 2 groups on 32 px images; consistency on crops gives 28 px images, which the
# ViT (built for 32 px) and convnext_atto (too small for its last downsampling) refuse: real failures
SMALL = {"models": ["resnet18", "vit_tiny_patch16_224", "convnext_atto"], "groups": ["translate_x", "rotate"],
         "measures": ["e2e", "metrics"], "n": 1, "seed": 0, "size": 32,
         "metrics": {"which": ["consistency", "eq_t", "invariance"],
                     "options": {"consistency": {"pairs": 2, "mode": "crop"}}}}
TINY = {"models": ["resnet18"], "groups": ["translate_x"], "measures": ["e2e"], "n": 1, "size": 32}


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def tables(store: Path) -> dict[str, pd.DataFrame]:
    return {t: ll.load(store, t) for t in st.TABLES}


def assert_same_tables(a: Path, b: Path) -> None:
    """The same rows, but for the node and process that wrote them."""
    for name, table in tables(a).items():
        pd.testing.assert_frame_equal(table.drop(columns=["ray_node", "pid"], errors="ignore"),
                                      tables(b)[name].drop(columns=["ray_node", "pid"], errors="ignore"), obj=name)


# --- spec checks ----------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"modles": ["resnet18"]}, "spec key 'modles' is unknown; valid keys: models, groups"),
    ({"groups": ["translate_x", "rotat"]}, "spec key 'groups': unknown group 'rotat'; valid groups: all, "),
    ({"models": ["resnet18", "no_such_net*"]}, "spec key 'models': 'no_such_net\\*' matches no timm model"),
    ({"measures": ["e2e", "lee"]}, "spec key 'measures': unknown measure 'lee'"),
    ({"n": 0}, "spec key 'n': expected a positive integer, got 0"),
    ({"layers": {"estimater": "exact"}}, "spec key 'layers.estimater' is unknown; valid keys: estimator"),
    ({"metrics": {"which": ["eq_x"]}}, "spec key 'metrics.which': unknown metric 'eq_x'"),
    ({"layers": {"alias": "yes"}}, "spec key 'layers.alias': expected true or false, got 'yes'"),
])
def test_bad_specs_are_refused_before_anything_runs(tmp_path, change, message):
    with pytest.raises(SpecError, match=message) as info:
        ll.sweep({**TINY, **change}, tmp_path / "s", workers=0)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "s").exists()


def test_bad_spec_file_is_one_line_from_the_cli(tmp_path, capsys):
    spec = write_spec(tmp_path / "bad.toml", 'models = ["resnet18"]\ngroups = ["spin"]\n')
    assert main(["sweep", str(spec), "--store", str(tmp_path / "s"), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"layerlie: error: {spec}: spec key 'groups': unknown group 'spin'")
    assert "\n" not in err
    broken = write_spec(tmp_path / "broken.toml", 'models = ["resnet18"\n')
    assert main(["sweep", str(broken), "--store", str(tmp_path / "s")]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_tasks_have_stable_distinct_ids_and_patterns_expand():
    spec = read_spec({**SMALL, "models": ["resnet18", "convnext_at*"], "measures": ["e2e", "layers", "metrics"]})
    first, again = tasks(spec), tasks(read_spec({**SMALL, "models": ["resnet18", "convnext_at*"],
                                                  "measures": ["e2e", "layers", "metrics"]}))
    models = ["resnet18", *timm.list_models("convnext_at*")]
    assert spec["models"] == models and len(models) > 2
    assert [t.id for t in first] == [t.id for t in again]
    assert len({t.id for t in first}) == len(first) == len(models) * (2 + 2 + 1)
    assert [t.group for t in first if t.model == "resnet18"] == ["translate_x", "rotate", "translate_x", "rotate",
                                                                 None]


def test_dry_run_lists_the_tasks_and_writes_nothing(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.toml", 'models = ["resnet18"]\ngroups = "all"\nmeasures = ["e2e"]\n')
    assert main(["sweep", str(spec), "--store", str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "e2e-resnet18-translate_x-" in out and "10 tasks, 0 done" in out
    assert not (tmp_path / "s").exists()


def test_dry_run_needs_no_weights_and_reads_a_store_of_checkpoints(tmp_path, offline, no_network):
    spec = {"models": [{"name": "test_resnet", "pretrained": True}], "groups": ["translate_x"], "n": 1, "size": 32}
    listed = ll.sweep(spec, tmp_path / "p", dry_run=True)  # no weights cached, no network
    assert [t.model for t in listed.tasks] == [f"test_resnet.{timm.models.get_pretrained_cfg('test_resnet').tag}"]
    assert not no_network, "a listing looks nowhere for the weights"
    with pytest.raises(SpecError, match="checkpoint"):  # running it needs them
        ll.sweep(spec, tmp_path / "p", workers=0, progress=False)
    path = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    spec = {**spec, "models": [{"name": "test_resnet", "checkpoint": str(path)}]}
    ran = ll.sweep(spec, tmp_path / "c", workers=0, progress=False)
    again = ll.sweep(spec, tmp_path / "c", dry_run=True, resume=True)
    assert ran.failed == {} and again.skipped == [t.id for t in ran.tasks]


# --- stores and specs -------------------------------------------------------------------------

def test_a_changed_spec_is_refused_without_force_new(tmp_path):
    store = tmp_path / "s"
    first = ll.sweep(TINY, store, workers=0, progress=False)
    assert first.failed == {} and len(ll.load(store, "e2e")) == 1
    with pytest.raises(SpecError, match="holds a sweep of a different spec \\(differs in: groups\\); pass "
                                        "--force-new"):
        ll.sweep({**TINY, "groups": ["rotate"]}, store, workers=0, progress=False)
    assert ll.load(store, "e2e").group.tolist() == ["translate_x"]  # left as it was
    ll.sweep({**TINY, "groups": ["rotate"]}, store, workers=0, progress=False, force_new=True)
    assert ll.load(store, "e2e").group.tolist() == ["rotate"]
    assert st.manifest(store)["spec"]["groups"] == ["rotate"]


def test_a_store_written_before_a_spec_key_existed_resumes(tmp_path):
    store = tmp_path / "s"
    ll.sweep(TINY, store, workers=0, progress=False)
    path = store / "manifest.json"
    data = json.loads(path.read_text())
    for key in ("device", "gpus_per_task"):  # keys this release added, absent from older stores
        del data["spec"][key]
    path.write_text(json.dumps(data))
    again = ll.sweep(TINY, store, workers=0, progress=False, resume=True)
    assert again.ran == [] and len(again.skipped) == len(again.tasks) == 1
    with pytest.raises(SpecError, match="differs in: device"):  # a value that differs is still refused
        ll.sweep({**TINY, "device": "auto"}, store, workers=0, progress=False, resume=True)


def test_a_raising_task_is_recorded_and_the_rest_finish(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.toml", 'models = ["vit_tiny_patch16_224", "resnet18"]\nmeasures = ["metrics"]\n'
                      'n = 1\nsize = 32\n[metrics]\nwhich = ["consistency"]\n'
                      'options = { consistency = { mode = "crop" } }\n')
    store = tmp_path / "s"
    assert main(["sweep", str(spec), "--store", str(store), "--workers", "0"]) == 1
    err = capsys.readouterr().err
    failed = st.failures(store)
    assert list(failed) == [t for t in st.done(store) | set(failed) if "vit" in t]
    assert f"layerlie: failed: {next(iter(failed))}: AssertionError: Input height (28) doesn't match model" in err
    record = next(iter(failed.values()))
    assert record["type"] == "AssertionError" and "Traceback" in record["traceback"]
    assert ll.load(store, "metrics").model.unique().tolist() == ["resnet18"]


def test_layers_and_ablation_tasks_carry_their_settings(tmp_path):
    spec = {**TINY, "measures": ["layers", "ablation"], "layers": {"estimator": "shares", "top": 5},
            "ablation": {"variants": ["blurpool"]}}
    result = ll.sweep(spec, tmp_path / "s", workers=0, progress=False)
    assert result.failed == {}
    layers = ll.load(tmp_path / "s", "layers")
    assert len(layers) == 5 and layers.share.abs().is_monotonic_decreasing
    assert set(layers[["model", "group", "scheme", "seed", "estimator"]].drop_duplicates().itertuples(index=False)) \
        == {("resnet18", "translate_x", "central", 0, "shares")}
    ablation = ll.load(tmp_path / "s", "ablation")
    assert ablation.variant.tolist() == ["original", "blurpool"] and (ablation.model == "resnet18").all()
    assert ablation.factor_translate_x.iloc[1] > 1  # BlurPool lowers the translation LEE


# --- Ray ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    """One local 2-CPU Ray for the module; sweeps reuse a session that is already open."""
    import ray

    temp = tempfile.mkdtemp(prefix="llray", dir="/tmp")  # short: Ray's socket paths are limited
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             object_store_memory=128 * 2**20, _temp_dir=temp)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_with_two_workers_gives_the_serial_tables(tmp_path, local_ray):
    serial = ll.sweep(SMALL, tmp_path / "serial", workers=0, progress=False)
    on_ray = ll.sweep(SMALL, tmp_path / "ray", workers=2, progress=False)
    assert local_ray.is_initialized()  # the fixture's session was used and left open
    assert sorted(on_ray.ran) == sorted(serial.ran) == sorted(t.id for t in serial.tasks)
    assert_same_tables(tmp_path / "serial", tmp_path / "ray")
    e2e = ll.load(tmp_path / "ray", "e2e")
    assert len(e2e) == 3 * 2 and set(e2e.columns) >= {"model", "group", "scheme", "seed", "lee", "weights", "host"}
    # each row names the process its task ran in: a Ray worker, or this one when serial
    assert os.getpid() not in set(e2e["pid"]) and set(ll.load(tmp_path / "serial", "e2e")["pid"]) == {os.getpid()}
    assert list(on_ray.failed) == list(serial.failed) == [t.id for t in serial.tasks
                                                          if t.measure == "metrics" and "resnet" not in t.model]
    assert {k: v["type"] for k, v in on_ray.failed.items()} == {k: v["type"] for k, v in serial.failed.items()}


def ray_processes(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (this test's Ray temp dir)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(pid))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_sigkill_then_resume_loses_nothing(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.toml", 'models = ["resnet18", "convnext_atto"]\ngroups = ["translate_x", "rotate"]\n'
                      'measures = ["e2e", "layers"]\nn = 1\nsize = 32\n')
    store, reference = tmp_path / "killed", tmp_path / "whole"
    temp = tempfile.mkdtemp(prefix="llkill", dir="/tmp")
    proc = subprocess.Popen([sys.executable, "-m", "layerlie.cli", "sweep", str(spec), "--store", str(store),
                             "--workers", "2"], env={**os.environ, "RAY_TMPDIR": temp}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 150
        while not st.done(store) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        before = {p.name: p.stat().st_mtime_ns for p in (store / "parts").glob("*.parquet")}
        assert 0 < len(before) < 8, "kill the sweep after its first part and before its last"
        left = ray_processes(temp)
        for _ in range(100):  # Ray's own processes share the driver's fate, asynchronously
            if not left:
                break
            time.sleep(0.1)
            left = ray_processes(temp)
        assert left == [], "Ray processes outlived the killed sweep"
    finally:
        for pid in ray_processes(temp):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    assert main(["sweep", str(spec), "--store", str(store), "--resume", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{8 - len(before)} tasks ran, {len(before)} skipped as done, 0 failed" in out
    assert {p: (store / "parts" / p).stat().st_mtime_ns for p in before} == before  # not redone
    ll.sweep(spec, reference, workers=0, progress=False)
    assert_same_tables(store, reference)  # loads every part: none is corrupt
    assert not [p for p in (store / "parts").iterdir() if p.suffix != ".parquet"]


def test_measures_are_a_registry_the_spec_reads():
    assert ll.list_measures() == sorted(ll.list_measures())
    layers = ll.get_measure("layers")
    assert layers.table == "layers" and layers.per_group and "alias" in layers.options
    assert not ll.get_measure("metrics").per_group
    with pytest.raises(ll.LayerlieError, match="unknown measure 'lee'; valid measures: ablation, e2e, layers"):
        ll.get_measure("lee")
    with pytest.raises(ll.LayerlieError, match="would write table 'nowhere', which a store does not hold"):
        ll.register_measure("nowhere")
