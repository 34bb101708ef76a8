"""The Prefect flows end to end on CPU with tiny random priors: caching, MLflow runs, reports.

One Prefect test harness (a temporary database and API) serves the module; the flows run in
process, with the `tiny` preset (the smoke preset cut to a few steps per stage).
"""
import json
import os
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
    # each step's record names the packages that can change its numbers, as this process has them
    from tasks.common import read_step_records

    records = read_step_records(out)
    assert {"coarse", "fine", "evaluate"} <= set(records)
    versions = records["fine"]["versions"]
    assert versions["torch"] == torch.__version__ and versions["python"] == __import__("platform").python_version()
    assert versions["diffusers"] == __import__("diffusers").__version__ and versions["lift3d"] is not None
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
    result = benchmark_flow(str(ds), str(root / "out"), _params(root, "tracking.system_metrics_interval=1"), limit=2,
                            preset="tiny")
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
    # the git commit on every run, system metrics sampled while a stage ran, the per-asset table on the parent
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True).stdout.strip()
    assert {r.data.tags.get("mlflow.source.git.commit") for r in [*parents, *children]} == {head}
    coarse = [r for r in children if r.data.tags["stage"] == "coarse"]
    assert all(any(k.startswith("system/cpu_utilization") for k in r.data.metrics) for r in coarse)
    from mlflow.tracking import MlflowClient

    table = MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns.db").download_artifacts(
        parents[0].info.run_id, "per_asset.json", str(root))
    assert "chair" in Path(table).read_text() and "ficus" in Path(table).read_text()
    # Prefect artifacts: the per-asset table, the report, the stages' progress
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["benchmark-mini-tiny", "benchmark-mini-tiny-report"])))}
        assert arts["benchmark-mini-tiny"].type == "table" and "chair" in str(arts["benchmark-mini-tiny"].data)
        assert arts["benchmark-mini-tiny-report"].type == "markdown" and "ficus" in arts["benchmark-mini-tiny-report"].data
        progress = [a for a in client.read_artifacts() if a.type == "progress" and "stage iterations" in (a.description or "")]
        assert {a.description for a in progress} >= {f"{n}: {s} stage iterations" for n in ("chair", "ficus")
                                                     for s in ("coarse", "fine")}
        assert all(a.data == 100.0 for a in progress if a.description.startswith(("chair", "ficus")))


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
    # one run at a time: a tick during a run is cancelled, not a second writer of the same folders
    assert d.concurrency_limit == 1 and d.concurrency_options.collision_strategy.value == "CANCEL_NEW"


@pytest.mark.slow
def test_two_dask_workers_give_the_meshes_of_one_process(harness):
    """Same seed, same numbers: the tiny benchmark in this process and on two Dask worker processes
    ends with identical checkpoints and meshes."""
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
    # one PyTorch thread on both sides: CPU sums compare bit for bit at one thread count, and a
    # Dask worker takes its count from OMP_NUM_THREADS (flows.benchmark.worker_env)
    params = _params(root, "tracking.enabled=false", "coarse.iters=6", "fine.iters=2", "cpu_threads=1")
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


def test_local_workers_share_the_cores_out(monkeypatch):
    """`--workers N`: each worker process runs its steps on cores ÷ N PyTorch threads, not on every
    core (two workers on two cores each taking two threads made a smoke coarse step 5× slower)."""
    from dask.distributed import Client, LocalCluster

    from flows.benchmark import task_runner, worker_env

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert worker_env(2)["OMP_NUM_THREADS"] == "4" and worker_env(3)["OMP_NUM_THREADS"] == "2"
    assert worker_env(16)["OMP_NUM_THREADS"] == "1"
    runner = task_runner(None, None, 2)  # as on an 8-core machine: 4 threads a worker
    monkeypatch.undo()

    def threads_in_a_step() -> int:  # nested: pickled by value for the worker
        import torch

        from core.params import load_params, resolve_device

        resolve_device(load_params("tiny"))
        return torch.get_num_threads()

    kwargs = dict(runner.cluster_kwargs, n_workers=1)
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        (threads,) = client.run(threads_in_a_step).values()
    assert threads == 4  # not distributed's default of 1, nor every core


def test_several_workers_a_gpu_each_see_their_own_gpu(monkeypatch):
    """`--gpus 2 --per-gpu 2`: four worker processes of a distributed.SpecCluster, worker i seeing GPU
    i mod 2 alone as its cuda:0, each on its share of the cores; started here for real (no GPU is
    needed to start them: only the variable each worker process is given is checked)."""
    from dask.distributed import Client, SpecCluster

    from core.errors import InputError
    from flows.benchmark import gpu_worker_specs, task_runner

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    runner = task_runner(2, None, None, per_gpu=2)
    monkeypatch.undo()
    assert runner.cluster_class == "distributed.SpecCluster"
    assert sorted(runner.cluster_kwargs["workers"]) == ["gpu0-0", "gpu0-1", "gpu1-0", "gpu1-1"]
    assert [s["options"]["env"]["CUDA_VISIBLE_DEVICES"] for s in gpu_worker_specs(3, 2).values()] == list("012012")
    for bad, why in (((None, None, None, 2), "needs --gpus"), ((2, None, None, 0), "at least 1")):
        with pytest.raises(InputError, match=why):
            task_runner(*bad[:3], per_gpu=bad[3])

    def seen() -> tuple[str, str]:  # nested: pickled by value for the worker
        import os

        return os.environ.get("CUDA_VISIBLE_DEVICES", ""), os.environ.get("OMP_NUM_THREADS", "")

    with SpecCluster(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
        client.wait_for_workers(4, timeout=120)
        got = sorted(client.run(seen).values())
    assert got == [("0", "2"), ("0", "2"), ("1", "2"), ("1", "2")]  # 8 cores ÷ 4 workers


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


# -- faults: one failed asset, clear errors ------------------------------------------------------

# the tiny preset cut to the least that still runs every step (these tests check plumbing)
_QUICK = ["tracking.enabled=false", "coarse.iters=2", "coarse.checkpoint_every=2", "fine.iters=1",
          "fine.checkpoint_every=1"]


def test_a_step_marker_stands_only_after_a_run_of_the_step_that_succeeded(tmp_path):
    from tasks.common import marked_on_success

    marker = tmp_path / "result.json"
    marker.write_text("an earlier run's")
    with pytest.raises(RuntimeError):
        with marked_on_success(tmp_path, "result.json"):
            assert not marker.exists()  # gone before the work: a killed run leaves none either
            marker.write_text("this run's")
            raise RuntimeError("failed after writing it")
    assert not marker.exists()
    with marked_on_success(tmp_path, "result.json"):
        marker.write_text("this run's")
    assert marker.read_text() == "this run's"


def test_gpu_steps_retry_once_but_never_on_the_users_errors():
    from prefect.states import Failed

    from core.errors import InputError, ModelNotFoundError
    from tasks.coarse import coarse_task
    from tasks.common import transient
    from tasks.fine import fine_task

    for t in (coarse_task, fine_task):
        assert t.retries == 1 and t.retry_condition_fn is transient
    assert not transient(None, None, Failed(data=InputError("not an image")))
    assert not transient(None, None, Failed(data=ModelNotFoundError("no such model")))
    assert transient(None, None, Failed(data=RuntimeError("CUDA error: an illegal memory access")))


def test_the_first_step_that_did_not_complete_is_the_failure():
    from prefect.states import Completed, Crashed, Failed, Pending

    from core.errors import InputError
    from flows.failures import StepFailed, first_failure

    class Done:  # a finished future
        def __init__(self, state):
            self.state = state

        def wait(self):
            pass

    upstream = Pending(name="NotReady")
    assert first_failure("a", {"prepare": Done(Completed()), "coarse": Done(Completed())}) is None
    f = first_failure("a", {"prepare": Done(Completed()), "coarse": Done(Failed(data=RuntimeError("nan\nat step 3"))),
                            "fine": Done(upstream)})
    assert (f.step, f.reason) == ("coarse", "RuntimeError: nan")
    assert isinstance(f.exception(), StepFailed) and str(f.exception()) == "coarse failed: RuntimeError: nan"
    f = first_failure("a", {"prepare": Done(Failed(data=InputError("not an image: x.png"))), "coarse": Done(upstream)})
    assert f.record() == {"asset": "a", "step": "prepare", "reason": "not an image: x.png"}
    assert isinstance(f.exception(), InputError)  # the user's error as it is: one line, exit 2
    assert first_failure("a", {"fine": Done(Crashed(message="worker lost"))}).reason == "CrashedRun: worker lost"


@pytest.mark.slow
def test_a_failed_asset_is_recorded_and_the_others_finish(harness, capsys):
    from flows.cli import main

    root = harness / "faults"
    ds, out = root / "three", root / "out"
    for name in ("chair", "drums", "ficus"):
        (ds / name).mkdir(parents=True)
        for f in ("rgba.png", "depth.png", "learned_embeds.bin"):
            shutil.copy(BENCH / "nerf4" / name / f, ds / name / f)
    broken = ds / "drums" / "rgba.png"
    broken.write_bytes(broken.read_bytes()[:2000])  # a truncated PNG
    sets = [a for s in _QUICK for a in ("--set", s)]
    rc = main(["benchmark", str(ds), "--out", str(out), "--preset", "tiny", *sets])
    assert rc == 1
    reason = f"image is not an image (cannot be decoded): {broken}"
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lift3d: error:")]
    assert err == [f"lift3d: error: drums: prepare failed: {reason}"]
    report = out / "three" / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert {k: summary[k] for k in ("assets", "evaluated", "failed")} == {"assets": 3, "evaluated": 2, "failed": 1}
    assert summary["failures"] == [{"asset": "drums", "step": "prepare", "reason": reason}]
    assert isinstance(summary["mean_psnr"], float)
    failures = (report / "report.md").read_text().split("## Failures (1)")[1]
    assert "drums" in failures and "prepare" in failures and "cannot be decoded" in failures
    per_asset = (report / "per_asset.csv").read_text()
    assert "chair" in per_asset and "ficus" in per_asset and "drums" not in per_asset
    for name in ("chair", "ficus"):
        assert (out / "three" / name / "metrics.json").is_file()
    assert not (out / "three" / "drums" / "metrics.json").exists()
    assert not (out / "three" / "drums" / "inputs" / "prepare.json").exists()


def _lift3d(*args: str, home: Path) -> "subprocess.CompletedProcess":
    """The CLI in a subprocess (its stderr as a user sees it), against the harness's Prefect API."""
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=600)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("lift3d: error:")]


@pytest.mark.slow
def test_generate_ends_on_one_line_for_a_bad_image_or_a_missing_model(harness):
    root = harness / "errors"
    root.mkdir()
    broken = root / "broken.png"
    broken.write_bytes((BENCH / "nerf4" / "mic" / "rgba.png").read_bytes()[:2000])
    quick = [a for s in _QUICK for a in ("--set", s)]
    r = _lift3d("generate", str(broken), "--preset", "tiny", *quick, "--out", str(root / "bad"), home=root)
    assert r.returncode == 2, r.stderr[-3000:]
    assert _error_lines(r.stderr) == [f"lift3d: error: image is not an image (cannot be decoded): {broken}"]
    assert "Traceback" not in r.stderr
    assert not (root / "bad" / "inputs" / "prepare.json").exists()

    v = _lift3d("-v", "generate", str(broken), "--preset", "tiny", *quick, "--out", str(root / "bad"), home=root)
    assert v.returncode == 2 and "Traceback" in v.stderr
    assert _error_lines(v.stderr) == _error_lines(r.stderr)

    mic, out = BENCH / "nerf4" / "mic", root / "no-model"
    m = _lift3d("generate", str(mic / "rgba.png"), "--preset", "smoke", "--set", "models.tiny=false",
                "--set", "sd.model=/nonexistent", "--set", "tracking.enabled=false", "--out", str(out), home=root)
    assert m.returncode == 2, m.stderr[-3000:]
    (line,) = _error_lines(m.stderr)
    assert "'/nonexistent' (sd.model)" in line
    assert "Traceback" not in m.stderr
    # prepare finished (its folder is complete, and cached for the next try); the failed step and
    # what follows left nothing that looks complete
    assert (out / "inputs" / "prepare.json").is_file()
    assert not (out / "textual_inversion" / "learned_embeds.bin").exists() and not (out / "metrics.json").exists()


@pytest.mark.slow
def test_a_stage_past_its_timeout_is_retried_from_its_checkpoint_then_one_line(harness, capsys):
    import logging

    from flows.cli import main

    engine, said = logging.getLogger("core.stages.engine"), []
    listener = logging.Handler(logging.INFO)
    listener.emit = lambda record: said.append(record.getMessage())
    engine.addHandler(listener)
    level, engine.level = engine.level, logging.INFO
    out = harness / "timeout"
    # no priors (quick to set up), a checkpoint every iteration, far more iterations than fit
    sets = ["tracking.enabled=false", "guidance.kind=none", "coarse.iters=100000", "coarse.checkpoint_every=1"]
    try:
        rc = main(["generate", str(BENCH / "nerf4" / "chair" / "rgba.png"), "--preset", "tiny",
                   *[a for s in sets for a in ("--set", s)], "--step-timeout", "6", "--out", str(out)])
    finally:
        engine.removeHandler(listener)
        engine.level = level
    assert rc == 1
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lift3d: error:")]
    assert err.startswith("lift3d: error: coarse failed: StepTimeout: ran past the step timeout of 6 s (at iteration ")
    assert any(m.startswith("resuming the coarse stage from step") for m in said), said  # the retry went on
    assert (out / "coarse" / "checkpoint.pt").is_file() and not (out / "coarse" / "result.json").exists()


# -- scheduled runs against a real Prefect server --------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    from flows.server import _die_with_parent as die

    die()


@pytest.mark.slow
@pytest.mark.timeout(2700)  # seen: 17 min for the run alone on a 2-core machine at load 20
def test_a_scheduled_benchmark_fires_on_a_prefect_server_and_completes(tmp_path):
    """`prefect server start` (a temporary database), then `lift3d schedule` with a one-minute cron
    serving the benchmark (tiny preset, two assets): the server schedules a run, the served process
    picks it up at its time, and the run is Completed with its report, as the server's API says."""
    import os
    import subprocess
    import sys
    import time

    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter, \
        FlowRunFilterDeploymentId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = Path(__file__).resolve().parents[1]
    ds = tmp_path / "mini"
    for name in ("chair", "ficus"):
        (ds / name).mkdir(parents=True)
        for f in ("rgba.png", "depth.png", "learned_embeds.bin"):
            shutil.copy(BENCH / "nerf4" / name / f, ds / name / f)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path}/prefect.db",
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5", PREFECT_RUNNER_POLL_FREQUENCY="5")
    logs = {n: open(tmp_path / f"{n}.log", "w") for n in ("server", "serve")}
    procs = []
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            env=env, stdout=logs["server"], stderr=subprocess.STDOUT, preexec_fn=_die_with_parent))
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and procs[0].poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
        env["PREFECT_API_URL"] = url
        sets = ["tracking.enabled=false", "coarse.iters=4", "fine.iters=2"]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "schedule", str(ds), "--out", str(tmp_path / "runs"),
             "--cron", "* * * * *", "--preset", "tiny", "--limit", "2", *[a for s in sets for a in ("--set", s)]],
            cwd=root, env=env, stdout=logs["serve"], stderr=subprocess.STDOUT, preexec_fn=_die_with_parent))

        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            deadline = time.time() + 1800  # a minute to the first tick, then two tiny assets on a busy CPU
            deployment, finished = None, None
            while finished is None:
                assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-4000:]
                assert procs[1].poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
                time.sleep(5)
                if deployment is None:
                    found = client.read_deployments(deployment_filter=DeploymentFilter(
                        name=DeploymentFilterName(any_=["mini-tiny"])))
                    deployment = found[0] if found else None
                    continue
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])))
                failed = [r for r in runs if r.state and r.state.type.value in ("FAILED", "CRASHED")]
                assert not failed, (failed[0].state, (tmp_path / "serve.log").read_text()[-4000:])
                finished = next((r for r in runs if r.state and r.state.is_completed()), None)
            assert [s.schedule.cron for s in deployment.schedules] == ["* * * * *"]
            assert finished.auto_scheduled and finished.parameters["preset"] == "tiny"
            assert deployment.global_concurrency_limit.limit == 1  # one run at a time (flows/schedules.py)
            history = [s.type.value for s in client.read_flow_run_states(finished.id)]
            assert history[0] == "SCHEDULED" and history[-1] == "COMPLETED", history
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs.values():
            f.close()
    summary = json.loads((tmp_path / "runs" / "mini" / "report" / "summary.json").read_text())
    assert summary["assets"] == 2 and summary["failed"] == 0


# -- generate-many: photos → assets with a manifest ----------------------------------------------

def test_generate_many_names_photos_and_splits_them_into_shards(tmp_path):
    from core.errors import InputError
    from flows.generate_many import asset_names, collect_photos, parse_shard, shard_of

    photos = collect_photos([str(BENCH / "*" / "*" / "rgba.png")])
    names = asset_names(photos)
    assert len(names) == 19 and "teddy_bear" in names and "chair" in names  # rgba.png: the folder's name
    assert collect_photos([str(BENCH / "nerf4")]) == sorted(BENCH.glob("nerf4/*/rgba.png"))  # no depth/normal maps
    listed = tmp_path / "photos.txt"
    listed.write_text(f"# two photos\n{BENCH / 'nerf4/chair/rgba.png'}\n\n{BENCH / 'nerf4/mic/rgba.png'}  # a mic\n")
    assert [p.parent.name for p in collect_photos([str(listed), str(BENCH / "nerf4/mic/rgba.png")])] == ["chair", "mic"]
    a, b = tmp_path / "a" / "cat", tmp_path / "b" / "cat"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "photo.jpg").write_bytes(b"x")
    assert sorted(asset_names([a / "photo.jpg", b / "photo.jpg"])) == ["a-cat", "b-cat"]  # parents where names clash
    with pytest.raises(InputError, match="not a photo, a folder, a glob or a list file"):
        collect_photos([str(tmp_path / "nothing.png")])
    with pytest.raises(InputError, match="1 ≤ i ≤ n"):
        parse_shard("0/4")
    shards = [shard_of(list(names), *parse_shard(f"{i}/3")) for i in (1, 2, 3)]
    assert sorted(n for s in shards for n in s) == sorted(names) and [len(s) for s in shards] == [7, 6, 6]
    assert shards[0] == shard_of(list(reversed(list(names))), 1, 3)  # by sorted name, whatever the order given


def test_generate_many_plans_around_what_is_done(tmp_path):
    from flows.generate_many import COLUMNS, plan, write_manifest

    out = tmp_path / "out"
    (out / "chair").mkdir(parents=True)
    (out / "chair" / "metrics.json").write_text("{}")
    (out / "drums").mkdir()  # ok in the manifest, but its metrics.json is gone: to do again
    rows = [{**{c: None for c in COLUMNS}, "asset": a, "status": s} for a, s in
            (("chair", "ok"), ("drums", "ok"), ("ficus", "failed"))]
    write_manifest(out, "manifest", rows)
    todo, kept, stem, total = plan([str(BENCH / "nerf4")], out)
    assert (sorted(todo), [r["asset"] for r in kept], stem, total) == (["drums", "ficus", "mic"], ["chair"], "manifest", 4)
    todo, kept, _, _ = plan([str(BENCH / "nerf4")], out, limit=1)
    assert list(todo) == ["drums"] and {r["asset"]: r["status"] for r in kept} == {
        "chair": "ok", "ficus": "pending", "mic": "pending"}
    todo, kept, stem, _ = plan([str(BENCH / "nerf4")], out, shard="2/2")  # drums, mic
    assert (sorted(todo), kept, stem) == (["drums", "mic"], [], "manifest-shard-2-of-2")


@pytest.mark.slow
def test_generate_many_records_a_failed_photo_and_skips_what_is_done_on_a_rerun(harness, capsys):
    """Two plain photos (RGB, no alpha: prepare segments them) and a truncated one, on two local Dask
    workers: two assets and a manifest with the failure's one-line reason, exit 1; the priors were
    loaded once per worker; the rerun skips the two and runs the broken one again."""
    import pandas as pd
    from PIL import Image

    from flows.cli import main

    root = harness / "many"
    photos = root / "photos"
    photos.mkdir(parents=True)
    for name in ("chair", "ficus"):
        rgba = Image.open(BENCH / "nerf4" / name / "rgba.png").convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.split()[3])
        flat.save(photos / f"{name}.jpg")
    (photos / "broken.jpg").write_bytes((photos / "chair.jpg").read_bytes()[:1500])
    out = root / "out"
    sets = [a for s in _QUICK for a in ("--set", s)]
    rc = main(["generate-many", str(photos), "--out", str(out), "--preset", "tiny", "--workers", "2", *sets])
    assert rc == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lift3d: error:")]
    (line,) = err  # core.inputs: a truncated JPEG "is not a readable image (truncated or corrupt)"
    assert line.startswith("lift3d: error: broken: prepare failed: image is not a") and line.endswith(
        str(photos / "broken.jpg"))
    m = pd.read_csv(out / "manifest.csv").set_index("asset")
    assert dict(m["status"]) == {"broken": "failed", "chair": "ok", "ficus": "ok"}
    assert m.loc["broken", "step"] == "prepare" and line.endswith(m.loc["broken", "error"])
    for name in ("chair", "ficus"):
        assert m.loc[name, "psnr"] > 0 and Path(m.loc[name, "mesh_glb"]).is_file() and m.loc[name, "seconds"] > 0
    assert pd.read_parquet(out / "manifest.parquet").shape[0] == 3
    summary = json.loads((out / "manifest.summary.json").read_text())
    # each worker that ran a stage loaded each of the two priors once, however many assets it ran
    assert all(w["prior_loads"] <= 2 for w in summary["workers"].values()), summary["workers"]
    assert summary["prior_loads"] <= 2 * len(summary["workers"]) and summary["prior_reuses"] >= 4

    rc = main(["generate-many", str(photos), "--out", str(out), "--preset", "tiny", "--workers", "2", *sets])
    assert rc == 1
    said = capsys.readouterr().out
    assert "3 photo(s); this shard 3: 2 done before (skipped), 1 to run" in said
    again = pd.read_csv(out / "manifest.csv").set_index("asset")
    assert list(again.loc[["chair", "ficus"], "finished"]) == list(m.loc[["chair", "ficus"], "finished"])
    summary = json.loads((out / "manifest.summary.json").read_text())  # this run's counts, not the kept rows'
    assert (summary["skipped_done"], summary["ran_now"], summary["assets"]) == (2, 1, 3)


def test_tables_reports_and_progress_become_prefect_artifacts(harness):
    """tasks/artifacts.py from a flow: a table (NaN → empty), a markdown report, a progress bar that
    ends at 100 % (a stage's callback); a key Prefect would reject is made valid."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from tasks.artifacts import artifact_key, progress_callback, publish_markdown, publish_table

    assert artifact_key("benchmark", "NeRF4_x", "smoke") == "benchmark-nerf4-x-smoke"

    @flow
    def publish():
        publish_table("t-nerf4 smoke", [{"asset": "chair", "psnr": 20.5}, {"asset": "drums", "psnr": float("nan")}])
        publish_markdown("t-report", "# report\nchair 20.5")
        cb = progress_callback(10, "artifact test: coarse stage iterations", min_interval=0)
        for step in range(10):
            cb(step, {})

    publish()
    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts() if a.key in ("t-nerf4-smoke", "t-report")}
        assert arts["t-nerf4-smoke"].type == "table" and "chair" in str(arts["t-nerf4-smoke"].data)
        assert arts["t-report"].type == "markdown" and "chair 20.5" in arts["t-report"].data
        bars = [a for a in client.read_artifacts() if a.type == "progress" and a.description == "artifact test: coarse stage iterations"]
        assert [a.data for a in bars] == [100.0]
