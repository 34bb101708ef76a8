"""MLflow bookkeeping of a stage run that was killed: continued by the resumed run, else ended FAILED."""
from __future__ import annotations

import json

from tasks.tracking import RUN_MARKER, stage_run


def _params(tmp_path) -> dict:
    return {"tracking": {"enabled": True, "mlflow_uri": f"sqlite:///{tmp_path}/mlruns.db", "experiment": "t"},
            "coarse": {"iters": 3}}


def _status(tmp_path, run_id):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db").get_run(run_id).info.status


def _killed_run(tmp_path, out) -> str:
    """A stage run whose process is killed (SIGKILL) mid-way: nothing of it can end the run."""
    import subprocess
    import sys

    code = (
        "import json, os, signal, sys; from tasks.tracking import stage_run\n"
        f"params = json.loads({json.dumps(json.dumps(_params(tmp_path)))})\n"
        f"with stage_run(params, 'a', 'coarse', out_dir={str(out)!r}) as run:\n"
        "    run.log_step(0, {'loss': 1.0}); run.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    return json.loads((out / RUN_MARKER).read_text())["run_id"]


def test_a_killed_run_is_continued_by_the_resumed_one(tmp_path):
    out = tmp_path / "coarse"
    killed = _killed_run(tmp_path, out)
    assert _status(tmp_path, killed) == "RUNNING"
    assert json.loads((out / RUN_MARKER).read_text())["run_id"] == killed
    with stage_run(_params(tmp_path), "a", "coarse", out_dir=out, resuming=True) as run:
        run.log_step(1, {"loss": 0.5})
    assert run.run_id == killed and _status(tmp_path, killed) == "FINISHED"


def test_a_killed_run_that_is_not_resumed_ends_failed(tmp_path):
    out = tmp_path / "coarse"
    killed = _killed_run(tmp_path, out)
    with stage_run(_params(tmp_path), "a", "coarse", out_dir=out, resuming=False) as run:
        pass
    assert run.run_id != killed
    assert _status(tmp_path, killed) == "FAILED" and _status(tmp_path, run.run_id) == "FINISHED"
