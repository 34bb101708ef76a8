"""The evidence scripts' own arithmetic: the line input_cases.py reports for a command's output, and
main_job_check.py's largest-component share (texture seams do not split a component)."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_the_line_a_person_reads():
    one_line = load("input_cases").one_line
    assert one_line("", "coarse:  50%|█ 1/2\rcoarse: 100%|██ 2/2\nlift3d: error: cannot write to --out x\n") == (
        "lift3d: error: cannot write to --out x", 1)
    tb = "Traceback (most recent call last):\n  File \"x\", line 1\nOSError: [Errno 30] Read-only file system\n"
    assert one_line("", "08:00 INFO a: b\n" + tb) == ("(traceback) OSError: [Errno 30] Read-only file system", 4)
    assert one_line("wrote out/rgba.png\n", "08:00 INFO a: b\nLoading weights: 100%|█| 3/3\n") == (
        "wrote out/rgba.png", 2)


def test_largest_component_share(tmp_path):
    import trimesh

    check = load("main_job_check")
    a = trimesh.creation.box()
    b = trimesh.creation.icosphere(subdivisions=1)
    b.apply_translation([5, 0, 0])
    both = trimesh.util.concatenate([a, b])
    both.export(tmp_path / "two.obj")
    r = check.components(tmp_path / "two.obj")
    assert r["components"] == 2 and r["faces"] == 12 + 80 and r["largest_share"] == 80 / 92
    # one box written with a vertex per face corner (as a UV atlas splits seams): still one component
    corners = a.vertices[a.faces].reshape(-1, 3)
    split = trimesh.Trimesh(corners, np.arange(len(corners)).reshape(-1, 3), process=False)
    split.export(tmp_path / "seams.obj")
    assert check.components(tmp_path / "seams.obj")["components"] == 1


def test_speed_plot_splits_a_coarse_iteration_by_scope(tmp_path):
    """scripts/speed_plot.py: each scope's share of a coarse iteration, the rest beside it; a run
    without scopes is all rest; the figure is written."""
    import json

    sp = load("speed_plot")
    profiled = {"stages": {"coarse": {"iters": 200, "ms_per_iter": 205.4}},
                "scopes": {"coarse": {"lift3d.render": {"seconds": 8.848}, "lift3d.backward": {"seconds": 15.847},
                                      "lift3d.guidance": {"seconds": 13.882}}}}
    split = sp.coarse_split(profiled)
    assert round(split["lift3d.render"], 2) == 44.24 and round(split["lift3d.guidance"], 2) == 69.41
    assert round(split["rest"], 2) == round(205.4 - 44.24 - 79.235 - 69.41, 2)
    plain = {"stages": {"coarse": {"iters": 200, "ms_per_iter": 634.8}}}
    assert sp.coarse_split(plain) == {"lift3d.render": 0.0, "lift3d.backward": 0.0, "lift3d.guidance": 0.0,
                                      "rest": 634.8}
    runs = []
    for name, r in (("a", profiled), ("b", plain)):
        r = {**r, "stages": {**r["stages"], "textual_inversion": {"wall_s": 50.0}, "fine": {"loop_s": 20.0}}}
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
        runs.append(f"{name}={tmp_path / f'{name}.json'}")
    assert sp.main([str(tmp_path / "plot.png")] + runs) == 0 and (tmp_path / "plot.png").stat().st_size > 1000
    # a split run at the paper's counts, its fine stage not yet run: named, not drawn as zero seconds
    assert sp.missing_stages(profiled) == ["textual_inversion", "fine"]
    assert sp.missing_stages(json.loads((tmp_path / "a.json").read_text())) == []
    (tmp_path / "p.json").write_text(json.dumps(profiled))
    assert sp.main(["--paper", str(tmp_path / "paper.png"), f"p={tmp_path / 'p.json'}"]) == 0
    assert (tmp_path / "paper.png").stat().st_size > 1000
    # --paper's right panel: the steady ms of each stage with the backends; a stage not run is 0
    ext = {"backends": {"hash_grid": "tcnn", "rasteriser": "nvdiffrast"},
           "stages": {"coarse": {"ms_per_iter_steady": 75.0}, "fine": {"ms_per_iter_steady": 82.5}}}
    assert sp.steady(ext) == {"coarse": 75.0, "fine": 82.5, "backends": "tcnn / nvdiffrast"}
    assert sp.steady(profiled) == {"coarse": 0.0, "fine": 0.0, "backends": "? / ?"}
    # --timeline: the pace between marks, per stage; runs without marks (before session 26) say so
    assert sp.pace([[0, 1.0], [25, 3.0], [50, 3.5], [50, 3.5]]) == ([25, 50], [80.0, 20.0])
    marked = {"stages": {"coarse": {"marks": [[0, 1.0], [25, 3.0], [50, 3.5]], "ms_per_iter_steady": 20.0,
                                    "above_steady_s": 1.5}}}
    (tmp_path / "m.json").write_text(json.dumps(marked))
    assert sp.main(["--timeline", str(tmp_path / "t.png"), f"m={tmp_path / 'm.json'}"]) == 0
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert sp.main(["--timeline", str(tmp_path / "none.png"), f"p={tmp_path / 'p.json'}"]) == 1
    # --steady: that panel for short runs side by side (an A/B), the figure written
    (tmp_path / "e.json").write_text(json.dumps(ext))
    assert sp.main(["--steady", str(tmp_path / "ab.png"), f"e={tmp_path / 'e.json'}", runs[0]]) == 0
    assert (tmp_path / "ab.png").stat().st_size > 1000
    # the fine stage's time outside its loop: set-up and, where recorded, the export apart
    fine = {"stages": {"fine": {"loop_s": 462.7, "outside_loop_s": 37.5, "outputs_s": 21.1}}}
    assert sp.fine_parts(fine) == {"loop": 462.7, "set-up": 37.5 - 21.1, "export": 21.1}
    assert sp.fine_parts({"stages": {"fine": {"loop_s": 1.0, "outside_loop_s": 2.0}}})["set-up"] == 2.0



def test_fidelity_variants_are_the_released_and_paper_readings():
    """scripts/fidelity_variants.py: every variant is a valid smoke override set; 'released' takes each
    item from the magic123 preset (the released code) except the lengths scaled to the smoke run, and
    each leave-one-out differs from 'released' in its own item group only."""
    from core.params import load_params

    fv = load("fidelity_variants")
    v = fv.variants()
    assert set(v) == {"released", "paper", *(f"paper{g}" for g in fv.GROUPS)}
    m123 = load_params("magic123")

    def value(p, key):
        for part in key.split("."):
            p = getattr(p, part)
        return p

    released = load_params("smoke", v["released"])
    for s in v["released"]:
        key = s.split("=")[0]
        if key not in fv.SCALED:
            assert value(released, key) == value(m123, key), key
    assert (released.coarse.ref_warmup, released.coarse.level_mask_levels, released.coarse.level_mask_iters) == (6, 3, 180)
    paper = load_params("smoke", v["paper"])
    assert (paper.sd.view_dependent_prompt, paper.zero123.angle_weighting, paper.camera.uniform_sphere_rate,
            paper.coarse.novel_background, paper.coarse.level_mask, paper.fine.laplacian_form) == (
        False, False, 0.0, "white", "none", "normalised")
    for g in fv.GROUPS:
        diff = {s.split("=")[0] for s in set(v[f"paper{g}"]) ^ set(v["released"])}
        assert diff and diff <= {s.split("=")[0] for s in fv.PAPER[g]}, g
    # at the paper's lengths 'released' is the magic123 preset itself, key for key
    full = fv.variants("magic123")
    assert set(full) == set(v)
    for s in full["released"]:
        key = s.split("=")[0]
        assert value(load_params("magic123", full["released"]), key) == value(m123, key), key
    assert load_params("magic123", full["paper"]).coarse.ref_warmup == 0
    assert fv.main(["--size", "huge", "paper"]) == 2


def test_scale_bench_photos_and_environment(tmp_path):
    """scripts/scale_bench.py (run only on GPU machines): its photos are written through the current
    API (an oracle object's reference view with its depth beside it), and its runs keep a PYTHONPATH
    already set (the GPU machine's packages) behind the repository, in a Prefect home of their own."""
    import os

    sb = load("scale_bench")
    photos = sb.write_photos(tmp_path / "photos", 2, "tiny")
    assert [p.parent.name for p in photos] == ["torus_00", "blocks_01"]
    assert all(p.is_file() and (p.parent / "depth.png").is_file() for p in photos)
    env = sb.child_env(tmp_path / "run", {"PYTHONPATH": "/tmp/site", "PREFECT_API_URL": "http://x", "A": "1"})
    assert env["PYTHONPATH"] == os.pathsep.join([str(ROOT), "/tmp/site"]) and env["A"] == "1"
    assert "PREFECT_API_URL" not in env and env["PREFECT_HOME"] == str(tmp_path / "run" / "prefect-home")
    assert sb.child_env(tmp_path, {})["PYTHONPATH"] == str(ROOT)


def test_scale_bench_keeps_earlier_runs_of_the_same_settings(tmp_path):
    """`--only 1` then `--only 4` on one OUT make one table; a run with other settings starts afresh."""
    import json

    sb = load("scale_bench")
    same = {"assets": 8, "preset": "magic123", "sets": ["device=cuda", "coarse.iters=30"]}
    f = tmp_path / "scale.json"
    assert sb.earlier_runs(f, same) == {}  # nothing yet
    f.write_text(json.dumps({**same, "runs": {"1": {"wall_seconds": 400.0}}}))
    assert sb.earlier_runs(f, same) == {"1": {"wall_seconds": 400.0}}
    assert sb.earlier_runs(f, {**same, "assets": 4}) == {}
    assert sb.earlier_runs(f, {**same, "sets": ["device=cuda", "coarse.iters=60"]}) == {}
    f.write_text("{not json")
    assert sb.earlier_runs(f, same) == {}


def test_flops_floor_counts_the_real_architectures_and_divides_by_hand():
    """scripts/flops_floor.py: FLOPs from the full-size configs on the meta device (no memory), each
    part positive, the step totals their sums; the floors are FLOPs / (peak × fraction)."""
    ff = load("flops_floor")
    tf = ff.step_tflops(batch=1)
    assert all(v > 0 for v in tf.values())
    assert tf["ti_step"] == tf["ti_vae_encode"] + tf["ti_unet_forward_backward"]
    assert tf["sds_step_both_priors"] == pytest.approx(
        tf["sds_sd_unet_cfg"] + tf["sds_vae_encode_forward_backward"] + tf["sds_zero123_unet_cfg"])
    # the SD UNet with CFG is two forwards at 64²; textual inversion's at batch 1 is one forward and a
    # backward through frozen weights (input gradients only: about one forward more)
    assert tf["sds_sd_unet_cfg"] == pytest.approx(tf["ti_unet_forward_backward"], rel=0.1)
    fl = ff.floors({"ti_step": 40.0, "sds_step_both_priors": 4.0}, peak_tflops=800.0, ti_steps=3000, guided_steps=100)
    assert fl["100%_of_peak"] == {"ti_ms_per_step": 50.0, "ti_total_s": 150.0, "sds_ms_per_step": 5.0, "sds_total_s": 0.5}
    assert fl["50%_of_peak"]["ti_total_s"] == 300.0


def test_install_extensions_says_what_is_wrong_in_one_line(tmp_path):
    """scripts/install_extensions.sh (tinycudann and nvdiffrast from upstream): a bad argument, or a
    machine without CUDA (CI's), stops before anything is fetched or built, exit 2, one line."""
    import subprocess

    def run(*args):
        r = subprocess.run(["bash", str(ROOT / "scripts" / "install_extensions.sh"), *args], capture_output=True,
                           text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
        return r.returncode, r.stderr.strip().splitlines()

    assert run("--only", "cutlass") == (2, ["install_extensions: --only takes tinycudann or nvdiffrast, not 'cutlass'"])
    assert run("--wheel-dir") == (2, ["install_extensions: --wheel-dir needs a folder"])
    assert run("--frobnicate")[0] == 2
    if not __import__("torch").cuda.is_available():
        assert run() == (2, ["install_extensions: no CUDA device for PyTorch here; the extensions are built for a GPU"])
    helped = subprocess.run(["bash", str(ROOT / "scripts" / "install_extensions.sh"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and "--src DIR" in helped.stdout and "nvdiffrast" in helped.stdout


def test_ti_speed_plots_its_variants_and_says_what_is_missing(tmp_path):
    """scripts/ti_speed.py --plot: a saved result → a PNG of the step's parts by variant; a missing
    file or missing arguments are one line, exit 2 (the timing itself needs a GPU)."""
    import json
    import subprocess

    src = tmp_path / "ti.json"
    src.write_text(json.dumps({"gpu": "test", "variants": {
        "default": {"ms_per_step_steady": 270.0, "scopes_ms_per_step": {"augment": 36.0, "vae_encode": 89.0,
                                                                       "unet": 52.0, "backward": 72.0}},
        "failed_one": {"failed": "RuntimeError: x"}}}))

    def run(*args):
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ti_speed.py"), *map(str, args)], capture_output=True,
                           text=True, timeout=120)
        return r.returncode, r.stderr.strip().splitlines()

    assert run("--plot", src, tmp_path / "ti.png")[0] == 0 and (tmp_path / "ti.png").stat().st_size > 5000
    assert run("--plot", tmp_path / "none.json", tmp_path / "x.png") == (2, [f"ti_speed.py: {tmp_path / 'none.json'} not found"])
    assert run()[0] == 2 and not (tmp_path / "x.png").exists()


def test_ti_speed_plots_a_clock_log(tmp_path):
    """scripts/ti_speed.py --plot-clocks: nvidia-smi's CSV (core.perf.GpuClocks's, session 30's) → a PNG;
    a missing log is one line, exit 2."""
    import subprocess

    def run(*args):
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ti_speed.py"), "--plot-clocks", *map(str, args)],
                           capture_output=True, text=True, timeout=120)
        return r.returncode, r.stderr.strip().splitlines()

    assert run(ROOT / "reports" / "speed" / "h200_ti_s30_clocks.csv", tmp_path / "c.png")[0] == 0
    assert (tmp_path / "c.png").stat().st_size > 5000
    assert run(tmp_path / "none.csv", tmp_path / "x.png") == (2, [f"ti_speed.py: {tmp_path / 'none.csv'} not found"])


def _plots_and_needs_a_gpu(script: str, src: Path, tmp_path: Path) -> None:
    """scripts/SCRIPT.py --plot SRC draws the PNG beside SRC; without --out, or (on a machine without
    CUDA) with it, the script says what is wrong in one line, exits 2 and writes nothing."""
    import subprocess

    def run(*args):
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), *map(str, args)],
                           capture_output=True, text=True, timeout=120)
        return r.returncode, r.stderr.strip().splitlines()

    assert run("--plot", src)[0] == 0 and src.with_suffix(".png").stat().st_size > 5000
    rc, err = run()
    assert rc == 2 and "--out is required" in err[-1]
    if not __import__("torch").cuda.is_available():
        rc, err = run("--out", tmp_path / "x.json")
        assert rc == 2 and err == [f"{script}: needs a CUDA device"] and not (tmp_path / "x.json").exists()


def test_vae_bench_plots_a_saved_result_and_needs_a_gpu_to_time(tmp_path):
    """scripts/vae_bench.py --plot: a saved result → a PNG beside it; timing without --out or
    without a CUDA device is one line and exit 2."""
    import json

    src = tmp_path / "vae.json"
    src.write_text(json.dumps({"gpu": "test", "rows": [
        {"resolution": res, "kernels": k, "ms": ms} for res, k, ms in
        ((512, "diffusers", 23.4), (512, "lift3d", 13.3), (256, "diffusers", 11.0), (256, "lift3d", 15.5))]}))

    _plots_and_needs_a_gpu("vae_bench", src, tmp_path)


def test_ti_speed_counts_the_steps_flops_part_by_part():
    """ti_speed.step_flops on the tiny SD (CPU): each part of the step does matmul work, the
    backward to the embedding row costs between half and three times the forwards it runs back through,
    the counts are linear in the batch, and each floor is its FLOPs over the measured matmul rate."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny_priors import tiny_models

    step_flops = load("ti_speed").step_flops
    one = step_flops(tiny_models()["sd"], torch.device("cpu"), batch=1, resolution=64, matmul=128)
    two = step_flops(tiny_models()["sd"], torch.device("cpu"), batch=2, resolution=64, matmul=128)
    parts = ("vae_encode", "text_encoder", "unet", "backward")
    assert all(one["gflop"][k] > 0 for k in parts)
    g = one["gflop"]  # the backward runs through the UNet and the text encoder to the row
    assert 0.5 * (g["unet"] + g["text_encoder"]) < g["backward"] <= 3 * (g["unet"] + g["text_encoder"])
    for k in parts:
        assert two["gflop"][k] == pytest.approx(2 * one["gflop"][k], rel=0.02)
    rate = two["matmul_tflops"]
    assert rate > 0 and two["floor_ms"]["unet"] == pytest.approx(two["gflop"]["unet"] / rate, rel=1e-3)
    assert two["floor_ms"]["step"] == pytest.approx(sum(two["floor_ms"][k] for k in parts), rel=1e-3)


def test_flop_floor_counts_the_full_size_priors_on_the_meta_device(tmp_path):
    """scripts/flop_floor.py: the full-size architectures' FLOPs without weights or a GPU. The
    textual inversion's VAE encoder and UNet forward are the counts ti_speed.py --flops made on the
    H200 (reports/speed/h200_ti_compile_s18.json); the stages' floors are their counts × the parts'
    sum at the given rate."""
    import json

    from core.params import load_params

    ff = load("flop_floor")
    gflop = ff.count_gflop()
    ti, it = gflop["textual_inversion_step"], gflop["guided_iteration"]
    on_gpu = json.loads((ROOT / "reports" / "speed" / "h200_ti_compile_s18.json").read_text())["flops"]["gflop"]
    assert ti["vae_encode"] == pytest.approx(on_gpu["vae_encode"], rel=1e-5)
    assert ti["unet"] == pytest.approx(on_gpu["unet"], rel=1e-5)
    # CFG: the UNet at batch 2 is 2/16 of the textual inversion's batch of 16 at the same 64² latent
    assert it["sd_unet_cfg"] == pytest.approx(ti["unet"] / 8, rel=1e-6)
    assert it["zero123_vae_encode_fwd_bwd"] < it["sd_vae_encode_fwd_bwd"] / 3  # 256² against 512²
    p = load_params("magic123")
    f = ff.floors(gflop, 500.0, p)
    assert f["stages"]["coarse"]["count"] == p.coarse.iters - p.coarse.ref_warmup == 4901
    assert f["stages"]["textual_inversion"]["seconds"] == pytest.approx(3000 * sum(ti.values()) / 500.0 / 1000)
    assert ff.main(["--tflops", "0"]) == 2


def test_step_bench_times_each_stages_optimiser_and_the_field_by_precision(tmp_path):
    """scripts/step_bench.py on the CPU at the tiny preset: a row for each stage's foreach Adam over
    that stage's parameters (fused is GPU-only: build_optimizer never fuses on a CPU, so no fused
    row), one for each field precision at each sample count, the cameras' two ways, the finiteness
    check's waiting one, and (under Triton's interpreter) the coverage pass's two; --plot draws a GPU
    result with a panel a part; timing without a CUDA device is one line and exit 2, nothing written."""
    import json
    import subprocess

    import torch

    from core.params import load_params
    from core.stages.coarse import NeRFRepresentation

    bench = load("step_bench")
    p = load_params("tiny")
    rows = bench.optimiser_rows(p, torch.device("cpu"), iters=2, warmup=1)
    coarse_n = sum(q.numel() for q in NeRFRepresentation(p, torch.device("cpu")).field.parameters())
    assert [(r["stage"], r["variant"]) for r in rows] == [("coarse", "foreach"), ("fine", "foreach")]
    assert rows[0]["parameters"] == coarse_n and rows[1]["parameters"] > coarse_n  # the fine stage adds the tets' SDF and deformation
    assert all(r["gpu_ms"] is None and r["host_ms"] > 0 for r in rows)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    frows = bench.field_rows(p, torch.device("cpu"), [64, 128], iters=1, warmup=0)
    assert [(r["samples"], r["variant"]) for r in frows] == [(n, v) for n in (64, 128) for v in ("fp32", "tf32", "bf16")]
    assert torch.backends.cuda.matmul.allow_tf32 is tf32  # the TF32 variant put the setting back

    crows = bench.camera_rows(p, torch.device("cpu"), iters=2, warmup=1)
    assert [r["variant"] for r in crows] == ["on the device", "host copy"] and all(r["host_ms"] > 0 for r in crows)
    krows = bench.check_rows(p, torch.device("cpu"), iters=2, warmup=1)  # fused Adam is GPU-only: one row
    assert [r["variant"] for r in krows] == ["foreach Adam, the host waits"]
    from _interpreted import run_interpreted

    cov = run_interpreted(
        "import sys, torch\nsys.path.insert(0, 'scripts')\nimport step_bench\nfrom core.params import load_params\n"
        "torch.save(step_bench.coverage_rows(load_params('tiny'), torch.device('cpu'), 80, 1, 0), sys.argv[-1])",
        tmp_path / "cov.pt")
    assert [(r["variant"], r["faces"]) for r in cov] == [("raster._boxes alone (before)", 80), ("Triton pass, boxes inside", 80)]

    gpu = [dict(r, gpu_ms=1.0 + i) for i, r in enumerate(rows + frows + crows + krows + cov)]
    src = tmp_path / "steps.json"
    src.write_text(json.dumps({"device": "test", "preset": "tiny", "rows": gpu}))

    def run(*args):
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "step_bench.py"), *map(str, args)], capture_output=True,
                           text=True, timeout=120)
        return r.returncode, r.stderr.strip().splitlines()

    assert run("--plot", src, tmp_path / "steps.png")[0] == 0 and (tmp_path / "steps.png").stat().st_size > 5000
    rc, err = run()
    assert rc == 2 and "--out is required" in err[-1]
    if not torch.cuda.is_available():
        rc, err = run("--out", tmp_path / "x.json")
        assert rc == 2 and err == ["step_bench: needs a CUDA device (it times GPU kernels)"] and not (tmp_path / "x.json").exists()


def test_hashgrid_check_plots_a_saved_result_and_needs_a_gpu_to_time(tmp_path):
    """scripts/hashgrid_check.py --plot: a saved result (session 33's H200 run, its atomics settings)
    → a PNG beside it; timing without --out, or without a CUDA device, is one line and exit 2."""
    import json
    import shutil

    src = tmp_path / "hc.json"
    shutil.copy(ROOT / "reports" / "speed" / "h200_hashgrid_atomics_s33_final.json", src)
    assert {"scalar", "runs"} <= set(json.loads(src.read_text())["atomics_ray_points"])

    _plots_and_needs_a_gpu("hashgrid_check", src, tmp_path)
