"""`dvc repro` as the README runs it (`.venv/bin/dvc repro`), in a fresh copy of the repository:
it builds the report, a second run does nothing, a fine-stage parameter reruns only fine, evaluate
and the report (the coarse steps finish `Cached`), and `dvc metrics show` prints the summary. Also
(quick): dvc.yaml's params and deps cover what the steps' cache keys read.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def _benchmark_stage() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["benchmark"]


def test_dvc_params_cover_every_section_a_step_reads():
    from core.params import STEP_READS

    params = set(_benchmark_stage()["params"])
    read = {s.split(".")[0] for sections in STEP_READS.values() for s in sections}
    assert read - params == set()
    assert "presets" in params and "tracking" not in params


def _project_imports(module: str) -> set[str]:
    """The flows/tasks/core modules that `module` imports, transitively (imports in functions too)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = ROOT / Path(*name.split(".")).with_suffix(".py")
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
    return {n for n in seen if n.split(".")[0] in ("flows", "tasks", "core")}


def test_dvc_deps_cover_the_code_the_stage_runs():
    """Every module the benchmark command runs, and every module a step's cache key hashes, lies
    under a dep of the stage: a code change that reruns a step also reruns the stage."""
    from tasks.caching import module_files
    from tasks.coarse import coarse_task
    from tasks.evaluate import evaluate_task
    from tasks.fine import fine_task
    from tasks.prepare import prepare_task
    from tasks.textual_inversion import textual_inversion_task

    deps = [ROOT / d for d in _benchmark_stage()["deps"] if "${" not in d]
    files = {ROOT / Path(*m.split(".")).with_suffix(".py") for m in _project_imports("flows.cli")
             | _project_imports("flows.benchmark")}
    for t in (prepare_task, textual_inversion_task, coarse_task, fine_task, evaluate_task):
        files |= set(module_files(*t.cache_policy.modules).values())
    assert len(files) > 40
    uncovered = sorted(str(f.relative_to(ROOT)) for f in files
                       if not any(f == d or d in f.parents for d in deps))
    assert uncovered == []


def _fresh_copy(tmp_path: Path) -> Path:
    """The checkout's tracked and untracked-but-not-ignored files in a new git repository, as a
    fresh clone of this working tree would have them, with ../shared and the setup line's .venv."""
    repo = tmp_path / "repo"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    (tmp_path / "shared").symlink_to(SHARED.resolve())
    (repo / ".venv").symlink_to(Path(sys.prefix))  # `python3 -m venv .venv && .venv/bin/pip install -e .`
    git = ["git", "-c", "user.email=test@lift3d", "-c", "user.name=test"]
    subprocess.run(git + ["init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["add", "-A"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "fresh"], cwd=repo, check=True)
    return repo


def _edit_params(repo: Path, edit) -> None:
    path = repo / "params.yaml"
    tree = yaml.safe_load(path.read_text())
    edit(tree)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def _run(cmd: str, repo: Path, env: dict) -> str:
    r = subprocess.run(cmd, shell=True, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{out[-4000:]}"
    return out


def _task_states(log: str) -> dict[str, str]:
    """{task name: final state} from the flow's log lines ('coarse-1a2: Finished in state Cached(...)')."""
    return {m[1]: m[2] for m in re.finditer(r"\b([a-z_-]+)-[0-9a-f]{3}: Finished in state (\w+)\(", log)}


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "benchmarks" / "nerf4").is_dir(), reason="needs ../shared/benchmarks")
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_dvc_repro_builds_then_does_nothing_then_reruns_only_the_fine_steps(tmp_path):
    repo = _fresh_copy(tmp_path)

    def tiny_cut(tree):  # the tiny preset on one object of one dataset, cut further: plumbing only
        tree["reproduce"].update(datasets=["nerf4"], presets=["tiny"], limit=1)
        tree["tracking"]["enabled"] = False
        tree["presets"]["tiny"]["coarse"].update(iters=4, checkpoint_every=2)
        tree["presets"]["tiny"]["fine"].update(iters=2, checkpoint_every=1)

    _edit_params(repo, tiny_cut)
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PATH": os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)}
    env.pop("PREFECT_API_URL", None)  # a fresh clone runs against Prefect's ephemeral server
    reports, chair = repo / "reports" / "tiny" / "nerf4", repo / "runs" / "tiny" / "nerf4" / "chair"

    first = _run(".venv/bin/dvc repro", repo, env)
    assert "Running stage 'benchmark@nerf4-tiny'" in first
    assert _task_states(first) == {"prepare": "Completed", "coarse": "Completed", "fine": "Completed",
                                   "evaluate": "Completed", "report": "Completed"}
    summary = json.loads((reports / "summary.json").read_text())
    assert (summary["assets"], summary["evaluated"], summary["failed"]) == (1, 1, 0)
    assert {"mean_psnr", "mean_lpips", "mean_clip_similarity"} <= set(summary)
    assert "chair" in (reports / "per_asset.csv").read_text() and (reports / "report.md").is_file()

    second = _run(".venv/bin/dvc repro", repo, env)
    assert "Stage 'benchmark@nerf4-tiny' didn't change, skipping" in second
    assert "Data and pipelines are up to date." in second and "Running stage" not in second

    coarse_done = (chair / "coarse" / "result.json").stat().st_mtime_ns
    fine_done = (chair / "fine" / "result.json").stat().st_mtime_ns
    _edit_params(repo, lambda tree: tree["fine"].update(mask_erode_px=1))  # read by the fine stage only
    third = _run(".venv/bin/dvc repro", repo, env)
    assert "Running stage 'benchmark@nerf4-tiny'" in third
    assert _task_states(third) == {"prepare": "Cached", "coarse": "Cached", "fine": "Completed",
                                   "evaluate": "Completed", "report": "Completed"}
    assert (chair / "coarse" / "result.json").stat().st_mtime_ns == coarse_done
    assert (chair / "fine" / "result.json").stat().st_mtime_ns != fine_done
    assert "Data and pipelines are up to date." in _run(".venv/bin/dvc repro", repo, env)

    shown = _run(".venv/bin/dvc metrics show", repo, env)
    assert "reports/tiny/nerf4/summary.json" in shown
    assert all(k in shown for k in ("evaluated", "failed", "mean_psnr", "mean_lpips", "mean_clip_similarity"))
