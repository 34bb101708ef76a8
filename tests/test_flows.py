"""The Prefect flows end to end on CPU with tiny random priors: caching, MLflow runs, reports.

One Prefect test harness (a temporary database and API) serves the module; the flows run in
process, with the `tiny` preset (the smoke preset cut to a few steps per stage).
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield tmp_path_factory.mktemp("flows")


def _params(root: Path, *extra: str):
    """The tiny preset tracking into `root`, as the CLI would pass it on."""
    from core.params import load_params

    return load_params("tiny", [f"tracking.mlflow_uri=sqlite:///{root}/mlruns.db", *extra])


def _runs(root: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns.db")
    exp = client.get_experiment_by_name("lift3d")
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.slow
def test_generate_runs_end_to_end_then_caches(harness):
    from flows.generate import generate_flow

    root = harness / "gen"
    obj = BENCH / "nerf4" / "mic"
    out = root / "mic"
    metrics = generate_flow(str(obj / "rgba.png"), str(out), _params(root), depth=str(obj / "depth.png"))
    for key in ("psnr", "lpips", "clip_similarity"):
        assert isinstance(metrics[key], float)
    assert json.loads((out / "metrics.json").read_text())["psnr"] == metrics["psnr"]
    for f in ("inputs/rgba.png", "inputs/depth.png", "textual_inversion/learned_embeds.bin",
              "coarse/checkpoint.pt", "coarse/result.json", "fine/result.json"):
        assert (out / f).is_file(), f
    runs = _runs(root)
    stages = sorted(r.data.tags.get("stage") for r in runs)
    assert stages == ["coarse", "evaluate", "fine"]
    coarse_run = next(r for r in runs if r.data.tags["stage"] == "coarse")
    assert coarse_run.data.params["coarse.iters"] == "8"
    assert "loss" in coarse_run.data.metrics

    # the same call again: every step is cached, nothing is rewritten
    stamps = {f: (out / f).stat().st_mtime_ns for f in ("coarse/result.json", "fine/result.json", "metrics.json")}
    again = generate_flow(str(obj / "rgba.png"), str(out), _params(root), depth=str(obj / "depth.png"))
    assert again["psnr"] == metrics["psnr"]
    assert {f: (out / f).stat().st_mtime_ns for f in stamps} == stamps

    # an evaluation-only parameter changes: only evaluation runs again
    generate_flow(str(obj / "rgba.png"), str(out), _params(root, "evaluate.psnr_cap=50"),
                  depth=str(obj / "depth.png"))
    assert (out / "coarse/result.json").stat().st_mtime_ns == stamps["coarse/result.json"]
    assert (out / "fine/result.json").stat().st_mtime_ns == stamps["fine/result.json"]
    assert (out / "metrics.json").stat().st_mtime_ns != stamps["metrics.json"]

    # a fine-stage parameter changes: the fine stage trains afresh (never resumes the old checkpoint at
    # its last step), the coarse stage stays cached
    from core.stages.engine import read_state

    before = read_state(out / "fine" / "checkpoint.pt")
    generate_flow(str(obj / "rgba.png"), str(out), _params(root, "fine.lr=0.05"), depth=str(obj / "depth.png"))
    after = read_state(out / "fine" / "checkpoint.pt")
    assert (out / "coarse/result.json").stat().st_mtime_ns == stamps["coarse/result.json"]
    assert after.params_digest != before.params_digest and after.step == before.step
    assert not torch.equal(after.representation["dmtet"]["sdf"], before.representation["dmtet"]["sdf"])
    assert json.loads((out / "fine" / "result.json").read_text())["params_digest"] == after.params_digest

    # a deleted stage folder is rebuilt, not trusted to the cache
    shutil.rmtree(out / "fine")
    generate_flow(str(obj / "rgba.png"), str(out), _params(root), depth=str(obj / "depth.png"))
    assert (out / "fine" / "result.json").is_file()


@pytest.mark.slow
def test_benchmark_flow_writes_a_report_with_nested_runs(harness):
    from flows.benchmark import benchmark_flow

    root = harness / "bench"
    ds = root / "mini"
    for name in ("chair", "ficus"):
        (ds / name).mkdir(parents=True)
        for f in ("rgba.png", "depth.png", "learned_embeds.bin"):
            shutil.copy(BENCH / "nerf4" / name / f, ds / name / f)
    result = benchmark_flow(str(ds), str(root / "out"), _params(root), limit=2, preset="tiny")
    assert set(result["assets"]) == {"chair", "ficus"}
    assert "mean_psnr" in result["means"]
    report = Path(result["report"]["report"]).read_text()
    assert "chair" in report and "ficus" in report
    # given tokens are used as is: no textual inversion ran
    assert not (root / "out" / "mini" / "chair" / "textual_inversion").exists()
    runs = _runs(root)
    parents = [r for r in runs if r.data.tags.get("kind") == "benchmark"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted((r.data.tags["asset"], r.data.tags["stage"]) for r in children) == sorted(
        (a, s) for a in ("chair", "ficus") for s in ("coarse", "fine", "evaluate"))
    assert "mean_psnr" in parents[0].data.metrics


def test_benchmark_rejects_a_folder_without_objects(tmp_path):
    from core.errors import InputError
    from flows.benchmark import discover

    with pytest.raises(InputError, match="no object folders"):
        discover(tmp_path)
    with pytest.raises(InputError, match="not found"):
        discover(tmp_path / "missing")
    assert [p.name for p in discover(BENCH / "nerf4", 2)] == ["chair", "drums"]


def test_scheduled_benchmark_deployment_carries_cron_and_parameters():
    from flows.schedules import benchmark_deployment

    from core.params import Params, load_params

    params = load_params("smoke", ["seed=3"])
    d = benchmark_deployment(str(BENCH / "nerf4"), "runs/nightly", "0 2 * * *", params, "smoke", 2)
    assert d.name == "nerf4-smoke"
    assert d.parameters["preset"] == "smoke" and d.parameters["limit"] == 2
    # the validated params travel as their JSON and come back as the same Params
    assert Params.model_validate(d.parameters["params"]) == params and d.parameters["params"]["seed"] == 3
    assert [s.schedule.cron for s in d.schedules] == ["0 2 * * *"]


@pytest.mark.slow
def test_two_dask_workers_give_the_meshes_of_one_process(harness):
    """Same seed, same numbers: the tiny benchmark in this process and on two Dask worker processes
    (which start with one CPU thread each) ends with identical checkpoints and meshes."""
    from dask.distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    from core.stages.engine import read_state
    from flows.benchmark import benchmark_flow

    root = harness / "dask"
    ds = root / "mini"
    for name in ("chair", "drums"):
        (ds / name).mkdir(parents=True)
        for f in ("rgba.png", "depth.png", "learned_embeds.bin"):
            shutil.copy(BENCH / "nerf4" / name / f, ds / name / f)
    # one stage iteration fewer than tiny: the test runs two benchmarks of two assets
    params = _params(root, "tracking.enabled=false", "coarse.iters=6", "fine.iters=2")
    benchmark_flow(str(ds), str(root / "local"), params, limit=2, preset="tiny")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        runner = DaskTaskRunner(address=cluster.scheduler_address)
        benchmark_flow.with_options(task_runner=runner)(str(ds), str(root / "dask"), params, limit=2, preset="tiny")
    for name in ("chair", "drums"):
        for stage in ("coarse", "fine"):
            a = read_state(root / "local" / "mini" / name / stage / "checkpoint.pt")
            b = read_state(root / "dask" / "mini" / name / stage / "checkpoint.pt")
            key = "field" if stage == "coarse" else "colour_field"
            for k, t in a.representation[key].items():
                assert torch.equal(t, b.representation[key][k]), (name, stage, k)
            ra = json.loads((root / "local" / "mini" / name / stage / "result.json").read_text())
            rb = json.loads((root / "dask" / "mini" / name / stage / "result.json").read_text())
            assert ra["mesh_faces"] == rb["mesh_faces"] > 0, (name, stage)


@pytest.mark.slow
def test_a_killed_generate_leaves_no_prefect_server_behind(tmp_path):
    """kill -9 of `lift3d generate` mid-run: its temporary Prefect server goes with it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    obj = BENCH / "nerf4" / "chair"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "generate", str(obj / "rgba.png"), "--out",
                             str(tmp_path / "run"), "--preset", "tiny", "--set", "coarse.iters=400",
                             "--set", f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlruns.db"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    me = psutil.Process(proc.pid)
    servers = []
    deadline = time.time() + 240
    while time.time() < deadline and not (servers and (tmp_path / "run" / "coarse").exists()):
        servers = [c for c in me.children(recursive=True) if "create_app" in " ".join(c.cmdline())]
        time.sleep(1)
    assert servers, "no temporary Prefect server was started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(servers, timeout=20)
    assert not alive, [p.pid for p in alive]
