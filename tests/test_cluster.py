"""Sweeps on a real Ray cluster (docs/design.md §4): a head and worker nodes as separate processes
on this machine, the serial tables again, lost nodes and drivers, out-of-memory tasks, GPU
placement with a custom resource standing in for GPUs, and the driver's heartbeat."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pandas as pd
import pytest

import layerlie as ll
from layerlie.cli import main
from layerlie.results import store as st
from layerlie.results.spec import SpecError, read_spec
from layerlie.results.sweep import MAX_RETRIES, SweepError, node_types, placement, status, tasks
from layerlie.testing import LocalCluster

TESTS = Path(__file__).parent

# 3 tiny random-init timm models x 2 groups x 2 measures at 32 px: 12 tasks
SPEC = ('models = ["resnet18", "vit_tiny_patch16_224", "convnext_atto"]\ngroups = ["translate_x", "rotate"]\n'
        'measures = ["e2e", "layers"]\nn = 1\nseed = 0\nsize = 32\n[layers]\nestimator = "shares"\n')


def labelled(models: int, build: str = "usernets:slow", **extra: str) -> str:
    """``models`` labels of ``build`` (``usernets:slow``: each task takes a couple of seconds) x 2
    groups, e2e."""
    entries = ", ".join(f'{{ callable = "{build}", label = "m{i}" }}' for i in range(models))
    lines = [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join([f"models = [{entries}]", 'groups = ["translate_x", "rotate"]', 'measures = ["e2e"]',
                      "n = 1", "size = 16", *lines]) + "\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def without_placement(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(columns=["ray_node", "pid"], errors="ignore")


@pytest.fixture(scope="module")
def cluster():
    """A head and two one-CPU worker nodes, one of them with two ``fake_gpu``, and this process
    connected to it as a driver, so that the sweeps run here share one Ray job and its worker
    processes; every process of the cluster is killed by its pid at the end, whatever the tests
    did."""
    import ray

    path = os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])
    local = LocalCluster(env={"PYTHONPATH": path})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        try:
            local.start()
            local.add_node(num_cpus=1, resources={"fake_gpu": 2})
            local.add_node(num_cpus=1)
            ray.init(address=local.address, log_to_driver=False, logging_level="ERROR")
            yield local
        finally:
            ray.shutdown()
            local.shutdown()
    assert local.pids() == []


def driver(cluster: LocalCluster, spec: Path, store: Path, *flags: str) -> subprocess.Popen:
    """``layerlie sweep`` against the cluster, as a process of its own session."""
    return subprocess.Popen([sys.executable, "-m", "layerlie.cli", "sweep", str(spec), "--store", str(store),
                             "--address", cluster.address, *flags], env=cluster.env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_a_part(store: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not st.done(store) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert st.done(store), f"no part within {timeout} s: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}"


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a driver and its process group, and close its pipes."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def sweep_here(spec: Path, store: Path, address: str, *flags: str) -> tuple[int, str, str]:
    """``layerlie sweep`` in this process, on the fixture's Ray session."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["sweep", str(spec), "--store", str(store), "--address", address, *flags])
    return code, out.getvalue(), err.getvalue()


# --- the placement, the spec and the status, without a cluster ---------------------------------

def test_placement_asks_for_a_gpu_share_and_refuses_what_the_cluster_lacks():
    cuda = read_spec({"models": ["resnet18"], "device": "cuda", "gpus_per_task": 0.25})
    auto = read_spec({"models": ["resnet18"], "device": "auto"})
    assert placement(cuda) == {"CPU": 1, "GPU": 0.25}
    assert placement(cuda, {"CPU": 4, "fake_gpu": 1}, gpu="fake_gpu") == {"CPU": 1, "fake_gpu": 0.25}
    assert placement(auto, {"CPU": 4, "GPU": 2}) == {"CPU": 1, "GPU": 1}
    assert placement(auto, {"CPU": 4}) == {"CPU": 1}  # auto runs on the CPUs of a cluster without GPUs
    with pytest.raises(SweepError, match="device = 'cuda': each task asks for CPU 1, GPU 0.25, but the cluster "
                                         "has CPU 4; set device = 'auto' or 'cpu'") as info:
        placement(cuda, {"CPU": 4, "fake_gpu": 1})
    assert "\n" not in str(info.value)
    with pytest.raises(SweepError, match="add worker nodes with CPUs"):
        placement(auto, {"CPU": 0})


@pytest.mark.parametrize("change, message", [
    ({"device": "gpu"}, "spec key 'device': expected one of cpu, cuda, auto, got 'gpu'"),
    ({"gpus_per_task": 0}, "spec key 'gpus_per_task': expected a fraction in \\(0, 1\\] or a whole number"),
    ({"gpus_per_task": 1.5}, "spec key 'gpus_per_task'"),
])
def test_bad_device_keys_are_refused(change, message):
    with pytest.raises(SpecError, match=message):
        read_spec({"models": ["resnet18"], **change})


def test_dry_run_counts_the_tasks_per_node_type(tmp_path, capsys):
    spec = write(tmp_path / "s.toml", 'device = "cuda"\ngpus_per_task = 0.25\n' + SPEC)
    assert main(["sweep", str(spec), "--store", str(tmp_path / "s"), "--dry-run"]) == 0
    assert "12 to run as GPU task (CPU 1, GPU 0.25)" in capsys.readouterr().out
    cpu = read_spec(tomllib.loads(SPEC))
    assert node_types(cpu, tasks(cpu)) == {"CPU task (CPU 1)": 12}
    assert node_types(cpu, []) == {}


def test_status_of_a_finished_serial_sweep(tmp_path, capsys):
    spec = write(tmp_path / "s.toml", 'models = ["usernets:tiny", "usernets:out_of_memory"]\n'
                 'groups = ["translate_x"]\nn = 1\nsize = 16\n')
    assert main(["sweep", str(spec), "--store", str(tmp_path / "s"), "--workers", "0"]) == 1
    capsys.readouterr()
    now = status(tmp_path / "s")
    assert (now.tasks, now.finished, now.failed, now.running, now.pending, now.alive) == (2, 1, 1, 0, 0, False)
    assert main(["sweep", "--status", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "2 tasks: 1 finished, 1 failed, 0 running, 0 pending" in out and "driver ended" in out
    assert st.failures(tmp_path / "s")[next(iter(st.failures(tmp_path / "s")))]["type"] == "MemoryError"
    assert main(["sweep", "--status", str(tmp_path / "nothing")]) == 2
    assert "is not a layerlie store (no manifest.json)" in capsys.readouterr().err


# --- on the cluster -------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_cluster_sweep_equals_the_serial_one_and_spreads_over_nodes(tmp_path, cluster, capsys):
    spec = write(tmp_path / "s.toml", SPEC)
    assert main(["sweep", str(spec), "--store", str(tmp_path / "serial"), "--workers", "0"]) == 0
    capsys.readouterr()
    assert main(["sweep", str(spec), "--store", str(tmp_path / "ray"), "--address", cluster.address]) == 0
    assert "12 tasks ran, 0 skipped as done, 0 failed" in capsys.readouterr().out
    for table in ("e2e", "layers"):
        serial, ray = ll.load(tmp_path / "serial", table), ll.load(tmp_path / "ray", table)
        assert len(serial) > 0
        pd.testing.assert_frame_equal(without_placement(serial), without_placement(ray), obj=table)
    rows = pd.concat([ll.load(tmp_path / "ray", t) for t in ("e2e", "layers")])
    workers = {cluster.node_id(n) for n in cluster.nodes}
    assert set(rows.ray_node) <= workers and rows.ray_node.nunique() == 2  # ran on both worker nodes, never the head
    assert rows.groupby("ray_node").pid.nunique().ge(1).all() and os.getpid() not in set(rows.pid)
    assert set(ll.load(tmp_path / "serial", "e2e").pid) == {os.getpid()}  # serial: this process
    beat = st.manifest(tmp_path / "ray")["heartbeat"]
    assert (beat["tasks"], beat["finished"], beat["failed"], beat["running"]) == (12, 12, 0, [])


@pytest.mark.slow
def test_cuda_on_a_cluster_without_gpus_is_refused_at_once(tmp_path, cluster, capsys):
    spec = write(tmp_path / "s.toml", 'models = ["usernets:tiny"]\ngroups = ["rotate"]\nn = 1\nsize = 16\n'
                 'device = "cuda"\n')
    assert main(["sweep", str(spec), "--store", str(tmp_path / "s"), "--address", cluster.address]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layerlie: error: device = 'cuda': each task asks for CPU 1, GPU 1, but the cluster has "
                          "CPU 2") and "\n" not in err
    assert not (tmp_path / "s").exists()  # refused before the store was written


@pytest.mark.slow
def test_gpu_tasks_run_on_the_node_with_the_gpu_resource(tmp_path, cluster):
    spec = tomllib.loads(labelled(3, "usernets:tiny", device='"auto"', gpus_per_task="0.5"))
    result = ll.sweep(spec, tmp_path / "s", address=cluster.address, gpu_resource="fake_gpu", progress=False)
    assert result.failed == {} and len(result.ran) == 6
    rows = ll.load(tmp_path / "s", "e2e")
    assert set(rows.ray_node) == {cluster.node_id("n1")}  # the one node that has fake_gpu got every task
    assert set(rows.device) == {"cpu"}  # auto: a fake GPU is no CUDA device, so the task measured on the CPU
    # without the stand-in, the same spec runs as CPU tasks, on both nodes
    again = ll.sweep(spec, tmp_path / "t", address=cluster.address, progress=False)
    assert again.failed == {} and ll.load(tmp_path / "t", "e2e").ray_node.nunique() == 2


@pytest.mark.slow
def test_a_task_out_of_memory_is_recorded_and_the_rest_go_on(tmp_path, cluster, capsys):
    spec = write(tmp_path / "s.toml", 'models = ["usernets:out_of_memory", "usernets:tiny", '
                 '"usernets:gpu_out_of_memory"]\ngroups = ["translate_x"]\nn = 1\nsize = 16\n')
    assert main(["sweep", str(spec), "--store", str(tmp_path / "s"), "--address", cluster.address]) == 1
    assert "3 tasks ran, 0 skipped as done, 2 failed" in capsys.readouterr().out
    failed = st.failures(tmp_path / "s")
    assert sorted(f["type"] for f in failed.values()) == ["MemoryError", "OutOfMemoryError"]
    assert all("out of memory in forward" in f["message"] for f in failed.values())
    assert ll.load(tmp_path / "s", "e2e").model.tolist() == ["usernets:tiny"]


@pytest.mark.slow
@pytest.mark.parametrize("retries", [MAX_RETRIES, 0])
def test_a_lost_node_loses_no_part(tmp_path, cluster, retries):
    """SIGKILL a worker node's raylet mid-sweep: its running task is rerun on the nodes left (or,
    with no retries, recorded as failed); every task ends as one part or one failure."""
    node = cluster.add_node(num_cpus=1)
    spec = write(tmp_path / "s.toml", labelled(6))
    store = tmp_path / "s"

    def kill_mid_sweep() -> None:
        deadline = time.monotonic() + 180
        while not st.done(store) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the freed slot is given its next task: every node is busy
        cluster.kill_node(node)

    killer = threading.Thread(target=kill_mid_sweep)
    killer.start()
    try:
        code, out, err = sweep_here(spec, store, cluster.address, "--max-retries", str(retries))
    finally:
        killer.join()
    ids = [t.id for t in tasks(read_spec(spec))]
    done, failed = st.done(store), st.failures(store)
    assert len(ids) == 12 and done | set(failed) == set(ids) and not done & set(failed)
    rows = ll.load(store, "e2e")
    assert len(rows) == len(done) and not rows.duplicated(["model", "group"]).any()
    if retries:
        assert code == 0 and failed == {}, err
    else:
        assert code == 1 and len(failed) >= 1, out
        assert {f["type"] for f in failed.values()} <= {"WorkerCrashedError", "NodeDiedError", "RayTaskError",
                                                        "LocalRayletDiedError", "ObjectLostError"}


@pytest.mark.slow
def test_status_follows_a_running_sweep_and_resume_after_killing_its_driver(tmp_path, cluster, capsys):
    spec = write(tmp_path / "s.toml", labelled(4))
    store = tmp_path / "s"
    proc = driver(cluster, spec, store)
    try:
        wait_for_a_part(store, proc)
        now, deadline = status(store), time.monotonic() + 30
        while now.running == 0 and now.finished < 8 and time.monotonic() < deadline:  # the next beat
            time.sleep(0.05)
            now = status(store)
        assert now.alive and now.tasks == 8 and now.running >= 1
        assert now.finished + now.failed + now.running + now.pending == 8
        assert main(["sweep", "--status", str(store)]) == 0
        assert f"driver running: driver pid {proc.pid}" in capsys.readouterr().out
    finally:
        kill(proc)
    before = {p.name: p.stat().st_mtime_ns for p in (store / "parts").glob("*.parquet")}
    dead = status(store)
    assert not dead.alive and dead.running == 0 and "rerun the sweep with --resume" in dead.driver
    assert 0 < dead.finished < 8 and dead.pending == 8 - dead.finished
    code, out, err = sweep_here(spec, store, cluster.address, "--resume")
    assert code == 0, err
    assert f"{8 - len(before)} tasks ran, {len(before)} skipped as done, 0 failed" in out
    assert {p: (store / "parts" / p).stat().st_mtime_ns for p in before} == before  # not redone
    end = status(store)
    assert (end.finished, end.failed, end.running, end.pending, end.alive) == (8, 0, 0, 0, False)
    assert not [p for p in (store / "parts").iterdir() if p.suffix != ".parquet"]
