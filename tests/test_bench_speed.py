"""`lift3d bench speed` plumbing on the CPU with the tiny priors (the figures come from the GPU)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from core.errors import InputError
from core.testmodels.fullsize_priors import FULLSIZE
from flows.bench_speed import format_table, run_speed_bench
from core.params import load_params
from _tiny_priors import tiny_models


def test_speed_bench_writes_speed_json(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFT3D_TINY_DIR", str(Path(tiny_models()["sd"]).parent))
    p = load_params("smoke", {"coarse.resolution": 32})
    r = run_speed_bench(p, torch.device("cpu"), iters=2, tiny=True, ti_steps=5, out=tmp_path, scene="image")
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["coarse_iteration"]["eager"]["iters"] == 2 and saved["coarse_iteration"]["eager"]["median_ms"] > 0
    assert saved["render"].startswith("learnable image 32x32")
    assert saved["textual_inversion"]["seconds_per_100_steps"] > 0 and saved["textual_inversion"]["steps_timed"] == 2
    assert set(saved["prior_only"]) == {"eager_sd", "eager_zero123"}
    assert "coarse iteration, both priors (eager)" in format_table(r)


def test_fullsize_weights_are_seeded_and_leave_the_callers_rng_alone():
    """Every copy of the full-size random priors holds the same weights (session 28: three unseeded
    copies grew meshes of 105k, 246k and 1.13M faces from one photo, and the stages' paces followed):
    seeded_module builds from its own seed and gives the caller's RNG back as it found it."""
    from diffusers import AutoencoderKL

    from core.testmodels.fullsize_priors import seeded_module

    cfg = dict(block_out_channels=[8], down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
               latent_channels=4, norm_num_groups=4, layers_per_block=1)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = (seeded_module(lambda: AutoencoderKL(**cfg), s, torch.device("cpu"), torch.float16) for s in (0, 0, 1))
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream went on as if nothing had been drawn
    sa, sb, sc = (m.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert sa["encoder.conv_in.weight"].dtype == torch.float16 and not any(p.requires_grad for p in a.parameters())
    assert not a.training


def test_fullsize_configs_are_the_real_architectures():
    """The configs build SD 1.5's 860M-parameter UNet shape (checked on the meta device: no memory)."""
    from diffusers import UNet2DConditionModel

    cfg = json.loads((FULLSIZE / "zero123_unet.json").read_text())
    assert cfg["in_channels"] == 8 and cfg["cross_attention_dim"] == 768
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((FULLSIZE / "sd15_unet.json").read_text()))
    n = sum(p.numel() for p in unet.parameters())
    assert 855e6 < n < 865e6


def test_sd21_base_configs_are_consistent123s_architecture():
    """Consistent123's SD 2.1 base: its UNet (865,910,724 parameters) and its OpenCLIP ViT-H text
    tower as a CLIPTextModel (340,387,840), the counts of the published checkpoints; the preset's
    model id picks it."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from core.params import load_params
    from core.testmodels.fullsize_priors import sd_arch_of

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((FULLSIZE / "sd21base_unet.json").read_text()))
        text = CLIPTextModel(CLIPTextConfig(**json.loads((FULLSIZE / "sd21base_text_encoder.json").read_text())))
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert sum(p.numel() for p in text.parameters()) == 340_387_840
    assert sd_arch_of(load_params("consistent123").sd.model) == "sd21base"
    assert sd_arch_of(load_params("magic123").sd.model) == "sd15"


def test_asset_bench_times_every_stage_of_one_asset(tmp_path, monkeypatch):
    """--stage asset on the CPU with tiny priors: textual inversion, coarse and fine through
    core.pipeline, each stage's wall time and ms per iteration in speed.json, the mesh exported."""
    from flows.bench_asset import format_asset_table, run_asset_bench

    monkeypatch.setenv("LIFT3D_TINY_DIR", str(Path(tiny_models()["sd"]).parent))
    p = load_params("smoke", ["models.tiny=true", "coarse.iters=2", "coarse.checkpoint_every=2", "fine.iters=2",
                              "fine.checkpoint_every=2", "textual_inversion.enabled=true", "textual_inversion.steps=2",
                              "textual_inversion.batch_size=1", "guidance.coarse.lambda_2d=1.0", "coarse.resolution=32", "fine.resolution=64",
                              "fine.tet_resolution=32"])
    r = run_asset_bench(p, torch.device("cpu"), tmp_path, tiny=True, progress=False, sync_audit=True,
                        metrics_callback=True)
    saved = json.loads((tmp_path / "speed.json").read_text())
    # --metrics-callback: every coarse and fine iteration's metrics reached the callback, as in a real run
    assert saved["metrics_callback"] is True
    assert [saved["stages"][s]["callback_iterations"] for s in ("coarse", "fine")] == [2, 2]
    # --sync-audit: a record per stage (a CPU run has no device to wait for: none counted)
    assert {s: v["total"] for s, v in saved["host_syncs"].items()} == {"textual_inversion": 0, "coarse": 0, "fine": 0}
    assert (tmp_path / "sync_audit.txt").read_text().startswith("textual_inversion: 0 host syncs")
    assert list(saved["stages"]) == ["textual_inversion", "coarse", "fine"]
    assert [saved["stages"][s]["iters"] for s in ("textual_inversion", "coarse", "fine")] == [2, 2, 2]
    for s in saved["stages"].values():
        assert s["wall_s"] > 0 and s["ms_per_iter"] > 0
    assert saved["stages"]["fine"]["outside_loop_s"] > 0  # set-up and export are part of the asset's time
    fine = saved["stages"]["fine"]  # the export (atlas, texture, OBJ, GLB, turntable) is part of it
    assert 0 < fine["outputs_s"] <= fine["outside_loop_s"]
    # the fine figure carries its mesh: the face counts the stage traced (trace.csv), none for coarse
    traced = pd.read_csv(tmp_path / "fine" / "trace.csv")["faces"]
    assert fine["faces_last"] == int(traced.iloc[-1]) > 0 and "faces_last" not in saved["stages"]["coarse"]
    assert f"fine: a mesh of {fine['faces_steady_median']:,} faces" in format_asset_table(r)
    # the coarse figure carries the samples its renders evaluated (trace.csv's samples), none for fine
    coarse_samples = pd.read_csv(tmp_path / "coarse" / "trace.csv")["samples"]
    assert saved["stages"]["coarse"]["samples_last"] == int(coarse_samples.iloc[-1]) > 0
    assert "samples_last" not in fine and "samples evaluated a render" in format_asset_table(r)
    ti = saved["stages"]["textual_inversion"]  # the loop's time apart from loading the model
    assert 0 < ti["loop_s"] < ti["wall_s"] and ti["outside_loop_s"] > 0
    assert abs(2 * ti["ms_per_iter"] / 1000 - ti["loop_s"]) <= 0.006  # loop_s is rounded to 10 ms
    assert saved["stages"]["coarse"]["ms_per_iter_steady"] is None  # 2 iterations: no two marks
    assert saved["backends"] == {"hash_grid": "torch", "rasteriser": "torch",  # the UNets: eager off a GPU
                                 "rasteriser_compile": "none", "volume_render_compile": "none",
                                 "volume_render_samples": "torch", "ti_tf32": False, "cudnn_benchmark": False,
                                 "unet_compile": {"sd": "none", "zero123": "none"},
                                 "unet_layout": {"sd": "inductor", "zero123": "inductor"},
                                 "vae_compile": {"sd": "none", "zero123": "none"},
                                 "vae_kernels": {"sd": "diffusers", "zero123": "diffusers"},
                                 "vae_graphs": {"sd": False, "zero123": False}, "guidance_streams": "one"}
    assert "UNets eager, VAE encoders eager on diffusers kernels;" in format_asset_table(r)
    forced = {**r, "backends": {**r["backends"], "unet_compile": {"sd": "graphs", "zero123": "graphs"},
                                "unet_layout": {"sd": "channels_last", "zero123": "inductor"}}}
    assert "UNets graphs channels-last (sd), VAE encoders" in format_asset_table(forced)
    beside = {**r, "backends": {**r["backends"], "guidance_streams": "two"}}
    assert "on diffusers kernels, the priors on two streams;" in format_asset_table(beside)
    graphed = {**r, "backends": {**r["backends"], "vae_graphs": {"sd": True, "zero123": False}}}
    assert "on diffusers kernels, replayed as CUDA graphs (sd);" in format_asset_table(graphed)
    rendered = {**r, "backends": {**r["backends"], "volume_render_compile": "default"}}
    assert "backends: hash grid torch (renderer compiled), rasteriser torch," in format_asset_table(rendered)
    sampled = {**r, "backends": {**r["backends"], "volume_render_samples": "triton"}}
    assert "backends: hash grid torch (samples on Triton), rasteriser torch," in format_asset_table(sampled)
    assert saved["asset_seconds"] >= sum(s["wall_s"] for s in saved["stages"].values()) - 0.1
    assert (tmp_path / "textual_inversion" / "learned_embeds.bin").is_file()
    assert any((tmp_path / "fine").glob("*.glb"))
    assert "whole asset:" in format_asset_table(r)
    # the card's clocks: none sampled off a GPU; a GPU's stage record (core.perf.GpuClocks) gets a line
    assert not any("clocks" in s for s in saved["stages"].values()) and "power cap" not in format_asset_table(r)
    clocked = {**r, "stages": {**r["stages"], "textual_inversion": {**ti, "clocks": {
        "busy_samples": 54, "sm_mhz_median": 1912.5, "power_w_median": 647.0, "util_median": 95.0,
        "power_capped_share": 0.944}}}}
    assert ("textual_inversion: while the GPU was busy, SM 1912 MHz and 647 W (medians), the power cap holding the "
            "clocks in 94% of 54 samples") in format_asset_table(clocked)
    # models.compile_ahead: auto runs no side process on a CPU; on a GPU the table says what it did
    assert "compile_ahead" not in ti and "compile ahead" not in format_asset_table(r)
    ahead = {**r, "stages": {**r["stages"], "textual_inversion": {**ti, "compile_ahead": {
        "seconds": 171.2, "guided_iterations": 4, "peak_gib": 9.1, "waited_s": 0.0, "compiles": {"graphs": 6}}}}}
    assert ("compile ahead (beside the textual inversion): the coarse stage's first 4 guided iterations in 171.2 s, "
            "peak 9.10 GiB; the textual inversion waited 0.0 s for it\n  its compiles: compiled 6 graphs") \
        in format_asset_table(ahead)
    failed = {**r, "stages": {**r["stages"], "textual_inversion": {**ti, "compile_ahead": {"error": "exit 1: boom"}}}}
    assert "compile ahead (beside the textual inversion): failed, exit 1: boom" in format_asset_table(failed)
    idle = {**r, "stages": {**r["stages"], "coarse": {**r["stages"]["coarse"], "clocks": {"samples": 140, "busy_samples": 0}}}}
    assert "coarse: the GPU under 50% busy in all 140 samples of its clocks" in format_asset_table(idle)
    with pytest.raises(InputError, match="--metrics-callback and --profile go apart"):
        run_asset_bench(p, torch.device("cpu"), tmp_path / "both", tiny=True, progress=False, profile_steps=2,
                        metrics_callback=True)


def test_profile_skips_the_reference_only_warm_up(tmp_path):
    """bench speed --profile N: torch.profiler's table covers N iterations after the stage's
    reference-only warm-up (which has no guidance) and 5 + 1 more, not the first ones."""
    import torch

    from flows.bench_asset import _Profile

    from core.perf import scope

    with _Profile(tmp_path / "p.txt", 2, torch.device("cpu"), skip=3) as prof:
        for i in range(14):
            with torch.profiler.record_function(f"iteration_{i:02d}"), scope("lift3d.step"):
                torch.ones(8).sum()
            prof.callback(i, {})
    text = (tmp_path / "p.txt").read_text()
    profiled = sorted(int(w[-2:]) for w in text.split() if w.startswith("iteration_"))
    assert profiled == [9, 10], profiled
    # the synchronised scope timing leaves the profiler's window (its warm-up 8 and 9, 10) free-running
    assert text.splitlines()[1].split()[:2] == ["lift3d.step", "11"]


def test_profile_after_moves_the_window_past_the_first_guided_iterations(tmp_path):
    """bench speed --profile N --profile-after K: the window starts K iterations later (a steady one,
    past the compiling and graph captures of the first guided iterations); a stage too short for it
    says so with the count it needs."""
    import torch

    from flows.bench_asset import _Profile
    from flows.cli import build_parser

    with _Profile(tmp_path / "p.txt", 2, torch.device("cpu"), skip=3, after=4) as prof:
        for i in range(20):
            with torch.profiler.record_function(f"iteration_{i:02d}"):
                torch.ones(8).sum()
            prof.callback(i, {})
    text = (tmp_path / "p.txt").read_text()
    assert sorted(int(w[-2:]) for w in text.split() if w.startswith("iteration_")) == [13, 14]
    with _Profile(tmp_path / "q.txt", 2, torch.device("cpu"), skip=3, after=4) as prof:
        for i in range(12):
            prof.callback(i, {})
    assert "the profile needs 15 (3 reference-only + 4 more (--profile-after) + 5 + 1 warm-up + 2)" in (
        tmp_path / "q.txt").read_text()
    args = build_parser().parse_args(["bench", "speed", "--out", str(tmp_path), "--profile", "10",
                                      "--profile-after", "300"])
    assert (args.profile, args.profile_after) == (10, 300)


def _two_sized_sums():
    """Two calls of one operator, one a hundred times the other's size (test_the_profile_by_...)."""
    import torch

    torch.ones(1000, 100).sum(1)
    torch.ones(10, 100).sum(1)


def test_the_profile_by_shape_and_by_stack_tells_which_call_of_an_operator_costs(tmp_path):
    """bench speed --profile N --profile-by op,shape,stack: after the operators' table, one by their
    inputs' shapes (the two sizes of one sum apart) and one by the Python lines that called them (this
    file's helper named); an unknown table is refused before anything loads, in one line."""
    import torch

    from core.errors import InputError
    from core.perf import profile_table
    from flows.bench_asset import _Profile, run_asset_bench
    from flows.cli import build_parser

    with _Profile(tmp_path / "p.txt", 2, torch.device("cpu"), skip=0, group=("op", "shape", "stack")) as prof:
        for i in range(8):
            _two_sized_sums()
            prof.callback(i, {})
    text = (tmp_path / "p.txt").read_text()
    assert "by shape:\n" in text, text[-600:]
    by_op, rest = text.split("by shape:\n")
    by_shape, by_stack = rest.split("by stack:\n")
    assert "aten::sum" in by_op and "[1000, 100]" not in by_op
    sums = [ln for ln in by_shape.splitlines() if ln.split()[:1] == ["aten::sum"]]
    assert any("[1000, 100]" in ln for ln in sums) and any("[10, 100]" in ln for ln in sums), sums
    assert "test_bench_speed.py" in by_stack and "_two_sized_sums" in by_stack
    # the same tables from a function profiled once (scripts/fine_mesh_bench.py --profile-by)
    once = profile_table(_two_sized_sums, torch.device("cpu"), group=("shape",))
    assert "[1000, 100]" in once and "by shape" not in once
    args = build_parser().parse_args(["bench", "speed", "--out", str(tmp_path), "--profile", "2",
                                      "--profile-by", "op,stack"])
    assert args.profile_by == "op,stack"
    p = load_params(preset="smoke")
    with pytest.raises(InputError, match="--profile-by: .*flame"):
        run_asset_bench(p, torch.device("cpu"), tmp_path / "bad", tiny=True, progress=False, profile_steps=2,
                        profile_by=("op", "flame"))
    assert not (tmp_path / "bad").exists()


def test_the_stack_table_asks_torch_to_keep_each_operators_own_stack():
    """profiler_options for 'stack' turn on the experimental config's `verbose`, without which
    torch.profiler keeps no operator's own Python stack (pytorch/pytorch#100253): the GPU machine's
    torch 2.11 gave none and no Python events either, so its call-site table named no line (session
    36). Here a real profiler's sum carries a stack that names this file's helper."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from core.perf import profiler_options

    assert "experimental_config" not in profiler_options(("op", "shape"))
    with profile(activities=[ProfilerActivity.CPU], **profiler_options(("stack",))) as prof:
        _two_sized_sums()
    sums = [e for e in prof.events() if e.name == "aten::sum"]
    assert len(sums) == 2
    assert all(any("_two_sized_sums" in f and "test_bench_speed.py" in f for f in e.stack) for e in sums), \
        [e.stack for e in sums]


def test_the_call_site_table_reads_an_operators_own_stack_and_its_backwards_forward():
    """kernel_ms_by_call_site on events as torch 2.11's profiler gives them on a GPU: each operator
    carries its own Python stack (innermost first, torch's frames among them) and the backward's run
    on the autograd engine's thread with none; their kernels' time goes to the project's lines, the
    backward's to its forward's ("backward of")."""
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType

    from core.perf import kernel_ms_by_call_site

    cpu = DeviceType.CPU
    stack = ["torch/nn/functional.py(10): f", "core/ops.py(17): gather_rows", "core/rendering/raster.py(237): _gather_at",
             "scripts/x.py(5): main"]
    fwd = E(name="aten::index_select", device_type=cpu, thread=1, sequence_nr=7, stack=stack, cpu_parent=None,
            kernels=[E(duration=300.0)])
    node = E(name="IndexSelectBackward0", device_type=cpu, thread=2, sequence_nr=7, fwd_thread=1, stack=[],
             cpu_parent=None, kernels=[])
    bwd = E(name="aten::index_add_", device_type=cpu, thread=2, sequence_nr=-1, stack=[], cpu_parent=node,
            kernels=[E(duration=500.0), E(duration=100.0)])
    lone = E(name="aten::mul", device_type=cpu, thread=2, sequence_nr=-1, stack=[], cpu_parent=None,
             kernels=[E(duration=50.0)])
    table = kernel_ms_by_call_site([fwd, node, bwd, lone], steps=2, depth=2).splitlines()
    assert "kernels/step" in table[0]
    assert table[1].split()[:3] == ["0.300", "1.0", "aten::index_add_"]
    assert table[1].endswith("backward of index_select at ops.py(17): gather_rows < raster.py(237): _gather_at")
    assert table[2].split()[:3] == ["0.150", "0.5", "aten::index_select"]
    assert table[2].endswith("ops.py(17): gather_rows < raster.py(237): _gather_at")
    assert table[3].endswith("(the autograd engine)")


def test_the_profile_counts_the_operators_each_scope_dispatched(tmp_path):
    """bench speed --profile N also writes, per scope, the operators the host dispatched a step:
    those called from outside another operator (linear's own addmm is not one), counted where they
    start, outside every scope under its own row."""
    import torch

    from core.perf import scope
    from flows.bench_asset import _Profile

    with _Profile(tmp_path / "p.txt", 2, torch.device("cpu"), skip=0) as prof:
        for i in range(8):
            with scope("lift3d.a"):
                x = torch.ones(4) * 2
                x = x + 1
            with scope("lift3d.b"):
                torch.nn.functional.linear(x, torch.ones(3, 4))
            x - 1
            prof.callback(i, {})
    text = (tmp_path / "p.txt").read_text()
    rows = {ln.split()[0]: ln for ln in text.split("operators the host dispatched, by scope:\n")[1].splitlines()[1:]}
    assert rows["lift3d.a"].split()[1] == "3" and "mul 1" in rows["lift3d.a"] and "add 1" in rows["lift3d.a"]
    assert rows["lift3d.b"].split()[1] == "2" and "linear 1" in rows["lift3d.b"] and "addmm" not in rows["lift3d.b"]
    assert "sub 1" in rows["(outside"]
    # the window's events, saved beside the table, read again give the same counts
    from core.perf import load_events, ops_by_scope

    again = ops_by_scope(load_events(tmp_path / "p_events.npz"), 2)
    assert again == text.split("operators the host dispatched, by scope:\n")[1].strip()


def test_a_profile_window_the_stage_never_reached_says_how_many_iterations_it_needs(tmp_path):
    """A stage shorter than the profile's window (reference-only warm-up + 5 + 1 + N) still writes
    its scope times, and says in one line why there is no table, with the count it needs."""
    import torch

    from flows.bench_asset import _Profile

    with _Profile(tmp_path / "p.txt", 2, torch.device("cpu"), skip=3) as prof:
        for i in range(7):
            torch.ones(8).sum()
            prof.callback(i, {})
    text = (tmp_path / "p.txt").read_text()
    assert text.startswith("scope")
    assert "no profiler table: the stage ran 7 iterations; the profile needs 11" in text


def test_a_profile_window_past_a_stages_end_is_refused_before_anything_loads(tmp_path):
    """bench speed --profile N --profile-after K on a stage shorter than its window (reference-only
    warm-up + K + 5 + 1 + N) is a one-line error naming each short stage and the count it needs,
    before a model loads or OUT is made; the stages not run and a textual inversion that is not
    needed are not counted."""
    import torch

    from core.errors import InputError
    from flows.bench_asset import _profile_window_misses, run_asset_bench

    p = load_params("magic123", {"coarse.iters": 300, "fine.iters": 200})
    assert p.fine.ref_warmup == 99 and p.textual_inversion.steps == 3000
    assert _profile_window_misses(p, ("fine",), 10, 150) == [("fine.iters", 200, 265)]  # session 34's call 5
    assert _profile_window_misses(p, ("coarse",), 10, 150) == []  # 300 ≥ 265
    assert _profile_window_misses(p, ("textual_inversion", "coarse", "fine"), 10, 190) == [
        ("coarse.iters", 300, 305), ("fine.iters", 200, 305)]
    assert _profile_window_misses(p, ("textual_inversion",), 10, 2990) == [("textual_inversion.steps", 3000, 3006)]
    assert _profile_window_misses(p.with_inputs(text="a teapot"), ("textual_inversion",), 10, 2990) == []
    with pytest.raises(InputError) as e:
        run_asset_bench(p, torch.device("cpu"), tmp_path / "out", tiny=True, progress=False, profile_steps=10,
                        profile_after=150, stages=("coarse", "fine"))
    assert "fine.iters=200 < 265" in str(e.value) and "coarse" not in str(e.value).split(":")[1]
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_the_detectors_clip_at_full_size_loads_through_the_real_loader(tmp_path):
    """bench speed --preset consistent123 on a machine without the real weights: the detector's CLIP
    is written once with random weights (here the tiny architecture; ViT-B-32 on the GPU machine) and
    the run's detector.clip_pretrained points at it; the file loads through load_clip."""
    import open_clip

    from core.evaluation.clip import load_clip
    from core.testmodels.fullsize_priors import VERSION, fullsize_judge_overrides, write_fullsize_clip
    from core.testmodels.judges import TINY_CLIP_CONFIG, TINY_CLIP_NAME

    cfg = tmp_path / f"{TINY_CLIP_NAME}.json"
    cfg.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(cfg)
    assert fullsize_judge_overrides(load_params("magic123"), tmp_path) == []  # no detector, nothing written
    c123 = load_params("consistent123", [f"detector.clip_model={TINY_CLIP_NAME}"])
    (override,) = fullsize_judge_overrides(c123, tmp_path)
    path = tmp_path / f"fullsize-clip-{TINY_CLIP_NAME}-{VERSION}.pt"
    assert override == f"detector.clip_pretrained={path}" and path.is_file()
    mtime = path.stat().st_mtime_ns
    assert write_fullsize_clip(tmp_path, TINY_CLIP_NAME) == path and path.stat().st_mtime_ns == mtime  # once
    state = torch.load(path)["state_dict"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    clip = load_clip(TINY_CLIP_NAME, str(path), "cpu", offline=True)
    ref = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    ref.load_state_dict(state)
    for k, v in ref.state_dict().items():
        assert torch.equal(clip.model.state_dict()[k].float(), v.float()), k


def test_asset_bench_split_across_runs_keeps_each_stages_record(tmp_path, monkeypatch):
    """--stages: textual inversion and the coarse stage in one run, the fine stage in a second (as on
    two machines, the coarse checkpoint carried over): speed.json ends with all three records and the
    asset's time as their sum. Run again, the finished textual inversion resumes at its last step
    (nothing left to train) and keeps its loop seconds. A fine stage without a coarse checkpoint, or
    an unknown stage, is a one-line error."""
    from core.errors import InputError
    from flows.bench_asset import run_asset_bench

    monkeypatch.setenv("LIFT3D_TINY_DIR", str(Path(tiny_models()["sd"]).parent))
    p = load_params("smoke", ["models.tiny=true", "coarse.iters=2", "coarse.checkpoint_every=2", "fine.iters=2",
                              "fine.checkpoint_every=2", "textual_inversion.enabled=true", "textual_inversion.steps=2",
                              "textual_inversion.batch_size=1", "guidance.coarse.lambda_2d=1.0", "coarse.resolution=32",
                              "fine.resolution=64", "fine.tet_resolution=32"])
    with pytest.raises(InputError, match="no coarse checkpoint"):
        run_asset_bench(p, torch.device("cpu"), tmp_path / "x", tiny=True, progress=False, stages=("fine",))
    with pytest.raises(InputError, match="choose from"):
        run_asset_bench(p, torch.device("cpu"), tmp_path / "x", tiny=True, progress=False, stages=("texture",))
    first = run_asset_bench(p, torch.device("cpu"), tmp_path, tiny=True, progress=False,
                            stages=("textual_inversion", "coarse"))
    assert list(first["stages"]) == ["textual_inversion", "coarse"] and "asset_seconds" not in first
    second = run_asset_bench(p, torch.device("cpu"), tmp_path, tiny=True, progress=False, stages=("fine",))
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert list(saved["stages"]) == ["textual_inversion", "coarse", "fine"] and saved["stages_this_run"] == ["fine"]
    assert saved["stages"]["coarse"] == first["stages"]["coarse"]  # kept as the first run measured it
    assert saved["asset_seconds"] == round(sum(s["wall_s"] for s in saved["stages"].values()), 1)
    assert second["stages"]["fine"]["iters"] == 2 and any((tmp_path / "fine").glob("*.glb"))
    again = run_asset_bench(p, torch.device("cpu"), tmp_path, tiny=True, progress=False,
                            stages=("textual_inversion",))["stages"]["textual_inversion"]
    ti = first["stages"]["textual_inversion"]
    assert again["resumed_from"] == 2 and again["loop_s"] == ti["loop_s"]  # nothing left: no seconds added


def _offline_triton_kernel():
    """lift3d's rasteriser coverage kernel compiled by Triton for an H100's architecture without a GPU
    (its own ptxas), into TRITON_CACHE_DIR: a real kernel's entry in Triton's cache; None without Triton."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from core.rendering import coverage_triton
    except ImportError:
        return None
    sig = {"pos_ptr": "*fp32", "tri_ptr": "*i32", "key_ptr": "*i64", "F": "i32", "V": "i32", "H": "i32",
           "W": "i32", "BLOCK": "constexpr"}
    try:
        return triton.compile(ASTSource(coverage_triton._cover, sig, constexprs={"BLOCK": 128}),
                              target=GPUTarget("cuda", 90, 64))
    except Exception:  # noqa: BLE001 — a Triton without its CUDA backend's tools here
        return None


def test_compile_cache_carries_compiled_code_to_a_fresh_cache(tmp_path, monkeypatch, caplog):
    """bench speed --compile-cache and models.compile_cache (core.perf): what torch.compile built, and the
    Triton kernels in Triton's cache (lift3d's own, which no torch cache carries), written to one file,
    rewritten only with something new; carried to empty Inductor and Triton caches (as on another
    machine) and read there by a pipeline stage before it runs: the same function compiles from it (a
    cache hit, core.perf.CompileLedger), and Triton finds the kernel where it looks (its group file's
    paths moved to the new folder), so it does not build it again. A file of torch's bytes alone (the
    format before session 41) still loads; a file torch cannot read is skipped with a warning."""
    import logging
    import shutil
    import zipfile

    from core.perf import CompileLedger, compile_line, load_compile_cache, save_compile_cache
    from core.pipeline import coarse_stage
    from tests.test_progress import TINY_NERF

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor_a"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton_a"))
    torch._dynamo.reset()
    x = torch.arange(8.0)
    with CompileLedger() as ledger:
        f = torch.compile(lambda v: (v.sin() * 3 + 1).sum())
        want = f(x)
        kernel = _offline_triton_kernel()
    assert ledger.record["graphs"] == 1 and ledger.record["inductor_cache_miss"] >= 1
    assert ledger.record.get("inductor_cache_hit", 0) == 0 and ledger.record["dynamo_s"] > 0
    assert ledger.record.get("triton_kernels", 0) == (kernel is not None)
    assert "compiled 1 graphs" in compile_line("coarse", ledger.record)
    path = tmp_path / "compile_cache.bin"
    assert not load_compile_cache(path)  # nothing there yet: nothing loaded
    assert save_compile_cache(path) > 0 and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert save_compile_cache(path) == 0 and path.stat().st_mtime_ns == stamp  # nothing new: not rewritten
    with zipfile.ZipFile(path) as zf:
        carried_kernels = {n.split("/")[1] for n in zf.namelist() if n.startswith("triton/")}
    assert len(carried_kernels) == (kernel is not None)
    carried = tmp_path / "carried" / "compile.bin"  # the file on "another machine"
    carried.parent.mkdir()
    shutil.copy(path, carried)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor_b"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton_b"))
    torch._dynamo.reset()
    p = load_params("tiny", {**TINY_NERF, "coarse.iters": 2, "models.compile_cache": str(carried)})
    bear = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "realfusion15" / "teddy_bear"
    coarse_stage(bear / "rgba.png", tmp_path / "coarse", p, bear / "depth.png", progress=False)
    with CompileLedger() as ledger:
        g = torch.compile(lambda v: (v.sin() * 3 + 1).sum())
        assert torch.equal(g(x), want)
    assert ledger.record["inductor_cache_hit"] >= 1  # the stage had read the carried file
    assert ledger.record.get("inductor_cache_miss", 0) == 0
    torch._dynamo.reset()
    if kernel is not None:  # the kernel's folder in the new Triton cache, its group pointing there
        from triton.runtime.cache import FileCacheManager

        (entry,) = carried_kernels
        group = FileCacheManager(entry).get_group("_cover.json")
        assert group and all(Path(v).parent == tmp_path / "triton_b" / entry for v in group.values())
        cubin = tmp_path / "triton_b" / entry / "_cover.cubin"
        made = cubin.stat().st_mtime_ns
        with CompileLedger() as ledger:
            again = _offline_triton_kernel()
        assert again.asm["cubin"] == kernel.asm["cubin"] and cubin.stat().st_mtime_ns == made  # found, not rebuilt
        assert "triton_kernels" not in ledger.record

    raw = tmp_path / "raw.bin"  # torch's bytes alone, as the file was before session 41
    with zipfile.ZipFile(path) as zf:
        raw.write_bytes(zf.read("torch_cache_artifacts.bin"))
    assert load_compile_cache(raw)
    torn = tmp_path / "torn.bin"
    torn.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="core.perf"):
        assert not load_compile_cache(torn)
    assert "not loaded" in caplog.text


def test_compile_ledger_names_why_a_graph_was_not_cached(tmp_path, monkeypatch, capsys):
    """core.perf.CompileLedger: a graph Inductor may not cache (here a custom pass Inductor cannot hash)
    is counted as bypassed with torch's reason, which its loggers give only at INFO; the loggers are as
    they were after the block, and nothing of theirs reached the output."""
    import logging

    from core.perf import CompileLedger, compile_line

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    codecache = logging.getLogger("torch._inductor.codecache")
    level, filters = codecache.level, list(codecache.filters)
    with CompileLedger() as ledger, torch._inductor.config.patch(post_grad_custom_post_pass=lambda g: None):
        torch.compile(lambda v: (v.cos() * 2).sum())(torch.arange(4.0))
    torch._dynamo.reset()
    rec = ledger.record
    assert rec["inductor_cache_bypass"] == 1 and "inductor_cache_miss" not in rec
    assert any("FX Graph Cache" in why and "custom pass" in why for why in rec["bypassed_because"])
    assert (codecache.level, codecache.filters) == (level, filters)
    assert "Bypassing" not in capsys.readouterr().err
    assert "bypassed" in compile_line("fine", rec) and "custom pass" in compile_line("fine", rec)


def test_compile_ledger_says_why_a_function_compiled_again():
    """core.perf.CompileLedger: a compiled function called with an input its guards do not accept (here
    another shape, with dynamic shapes off) compiles again; the ledger names the function and Dynamo's
    reason, and a block that only reuses what compiled records nothing."""
    from core.perf import CompileLedger, compile_line

    torch._dynamo.reset()

    def moments_like(v):
        return (v * 2).sum()

    f = torch.compile(moments_like, backend="eager", dynamic=False)
    f(torch.ones(4))
    with CompileLedger() as ledger:
        f(torch.ones(4))
    assert ledger.record == {}  # nothing new: nothing recorded
    with CompileLedger() as ledger:
        f(torch.ones(6))
    torch._dynamo.reset()
    (why, n), = ledger.record["recompiled_because"].items()
    assert n == 1 and why.startswith("moments_like: ") and "size" in why
    assert ledger.record["frames"] == 1
    assert "recompiled, moments_like" in compile_line("fine", ledger.record)


def test_trace_workload_is_the_steady_rows_median_and_the_last_row(tmp_path):
    """bench speed's workload of a stage: the fine mesh's faces or the coarse renders' samples, the
    median over the trace rows that the steady ms per iteration covers and the last row's; nothing
    for a trace without either, or no trace."""
    from flows.bench_asset import trace_workload

    pd.DataFrame({"step": [0, 100, 200, 300, 400], "loss": 1.0,
                  "faces": [10, 1000, 3000, 2000, 2500]}).to_csv(tmp_path / "t.csv", index=False)
    assert trace_workload(tmp_path / "t.csv", 200) == {"faces_steady_median": 2500, "faces_last": 2500}
    assert trace_workload(tmp_path / "t.csv", 0) == {"faces_steady_median": 2000, "faces_last": 2500}
    assert trace_workload(tmp_path / "t.csv", 900)["faces_steady_median"] == 2000  # past the trace: all rows
    pd.DataFrame({"step": [0, 1], "occupied": [0.1, 0.2]}).to_csv(tmp_path / "c.csv", index=False)
    assert trace_workload(tmp_path / "c.csv", 0) == {} and trace_workload(tmp_path / "none.csv", 0) == {}
    pd.DataFrame({"step": [0, 100, 200], "occupied": 0.1,
                  "samples": [900, 400, 600]}).to_csv(tmp_path / "s.csv", index=False)
    assert trace_workload(tmp_path / "s.csv", 100) == {"samples_steady_median": 500, "samples_last": 600}


def test_gpu_idle_charges_each_gap_to_the_scope_and_the_host_operator_during_it(tmp_path):
    """The device's idle gaps (between kernels) charged to the innermost scope open on the host and to
    the top-level operators running then; a nested operator is not charged twice."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    from core.perf import gpu_idle

    def ev(name, a, b, dev=DeviceType.CPU, parent=None):
        return NS(name=name, time_range=NS(start=a, end=b), device_type=dev, cpu_parent=parent)

    add = ev("aten::add", 1000, 1200)
    events = [ev("lift3d.a", 0, 1000), ev("lift3d.b", 1000, 2000), ev("lift3d.inner", 700, 800),
              ev("k1", 0, 100, DeviceType.CUDA), ev("k2", 500, 600, DeviceType.CUDA), ev("k3", 550, 580, DeviceType.CUDA),
              ev("k4", 1500, 2000, DeviceType.CUDA),
              ev("aten::nonzero", 50, 400), add, ev("aten::mul", 1050, 1100, parent=add),
              # the host's ranges mirrored on the device, and a synchronisation's device side: not work
              ev("lift3d.a", 0, 1000, DeviceType.CUDA), ev("ProfilerStep#3", 0, 2000, DeviceType.CUDA),
              ev("ProfilerStep#3", 0, 2000), ev("Stream Sync", 600, 1500, DeviceType.CUDA)]
    text = gpu_idle(events, steps=2)
    # a compiled graph's Triton kernel has a host range of its name: the kernel is work all the same
    launcher = [ev("triton_poi_fused_add_0", 1490, 1495), ev("triton_poi_fused_add_0", 1500, 1510, DeviceType.CUDA)]
    assert gpu_idle(events + launcher, steps=2).startswith("device busy 0.35 ms a step")
    alone = gpu_idle([events[3]] + launcher, steps=2)  # k1 (0-100 µs) and the Triton kernel (1,500-1,510 µs)
    assert alone.startswith("device busy 0.06 ms a step, idle 0.70 ms"), alone
    sections, rows = {}, None
    for ln in text.splitlines()[1:]:
        if "ms/step" in ln:
            rows = sections.setdefault(ln.split(",")[1].split()[2], {})
        else:
            rows[ln[:40].strip()] = float(ln[40:])
    # gaps 100-500 and 600-1500: 1,300 µs idle of a 2,000 µs window, two steps
    assert text.startswith("device busy 0.35 ms a step, idle 0.65 ms in 1 gaps")
    assert sections["scope"] == {"lift3d.a": 0.35, "lift3d.inner": 0.05, "lift3d.b": 0.25}
    assert sections["host"] == {"nonzero": 0.15, "add": 0.1, "(under no operator: Python, the engine)": 0.4}
    # the shortest event open: ProfilerStep, the scopes, then the operators (mul inside add)
    assert sections["innermost"] == pytest.approx({"lift3d.a": 0.2, "aten::nonzero": 0.15, "lift3d.b": 0.15,
                                                   "aten::add": 0.075, "lift3d.inner": 0.05, "aten::mul": 0.025,
                                                   "(under no host event)": 0.0}, abs=0.006)
    from core.perf import load_events, save_events

    save_events(events, tmp_path / "e.npz")
    assert gpu_idle(load_events(tmp_path / "e.npz"), steps=2) == text


def test_a_stages_timing_keeps_its_marks_and_the_seconds_above_its_steady_pace():
    """bench speed's per-stage figures: the steady ms between the marks from `from_step` on, the loop's
    seconds beyond that pace (what the first iterations cost: compiling, captures), and the marks
    themselves for speed_plot.py --timeline; without two marks no steady figure and nothing above it."""
    from flows.bench_asset import format_asset_table, timing

    marks = [[25, 9.0], [50, 9.9], [75, 10.8], [100, 11.7]]  # 36 ms an iteration once warm
    t = timing(12.6, 125, marks, 50)
    assert t["ms_per_iter"] == 100.8 and t["ms_per_iter_steady"] == 36.0
    assert t["above_steady_s"] == round(12.6 - 125 * 0.036, 1) == 8.1
    assert t["marks"] == marks
    assert timing(1.0, 10, [[0, 0.1]], 0) == {"ms_per_iter": 100.0, "ms_per_iter_steady": None,
                                              "above_steady_s": None, "marks": [[0, 0.1]]}
    r = {"gpu": "cpu", "device": "cpu", "torch": "x", "method": "magic123", "models": "tiny",
         "backends": {"hash_grid": "torch", "rasteriser": "torch"},
         "stages": {"coarse": {"iters": 125, "wall_s": 14.0, "outside_loop_s": 1.4, **t}}}
    assert "coarse: the loop took 8.1 s above its steady pace" in format_asset_table(r)


def test_assets_in_one_process_each_get_their_own_record(tmp_path, monkeypatch, capsys):
    """bench speed --assets 2: the asset twice in one process (OUT, OUT/asset_2), as a worker that
    generates many runs them; each keeps its speed.json and OUT/speed.json lists both assets' stage
    figures; a line per asset ends the output. --assets 0, or a fine stage without the coarse one
    for a further asset, is a one-line error before anything runs."""
    from flows.cli import main

    monkeypatch.setenv("LIFT3D_TINY_DIR", str(Path(tiny_models()["sd"]).parent))
    sets = [a for kv in ("coarse.iters=2", "coarse.checkpoint_every=2", "coarse.resolution=32")
            for a in ("--set", kv)]
    out = tmp_path / "b"
    out.mkdir()  # an earlier run's record of another stage (chain.sh's SPEED_JSON): kept, not an asset's here
    (out / "speed.json").write_text(json.dumps({"stages": {"textual_inversion": {
        "wall_s": 5.0, "iters": 2, "loop_s": 4.0, "ms_per_iter": 2000.0, "ms_per_iter_steady": None,
        "outside_loop_s": 1.0, "peak_gib": None}}}))
    assert main(["bench", "speed", "--tiny", "--preset", "smoke", "--out", str(out), "--stages", "coarse",
                 "--assets", "2", "--models-dir", str(tmp_path / "models"), *sets]) == 0
    first = json.loads((out / "speed.json").read_text())
    second = json.loads((out / "asset_2" / "speed.json").read_text())
    rows = first["assets_in_process"]
    assert [r["dir"] for r in rows] == [str(out), str(out / "asset_2")]
    assert rows[1]["stages"]["coarse"]["wall_s"] == second["stages"]["coarse"]["wall_s"] > 0
    assert rows[0]["stages"]["coarse"]["loop_s"] == first["stages"]["coarse"]["loop_s"]
    assert "textual_inversion" in first["stages"]  # the earlier record stays in OUT's speed.json …
    assert [list(r["stages"]) for r in rows] == [["coarse"], ["coarse"]]  # … but each row is what ran here
    assert (out / "asset_2" / "coarse" / "checkpoint.pt").is_file()
    printed = capsys.readouterr().out
    assert "2 assets in one process" in printed and "  asset 2: " in printed
    for argv, msg in ((["--assets", "0", "--stages", "coarse"], "at least 1"),
                      (["--assets", "2", "--stages", "fine"], "need the coarse")):
        assert main(["bench", "speed", "--tiny", "--preset", "smoke", "--out", str(tmp_path / "x"), *argv, *sets]) != 0
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_kernel_time_is_charged_once_to_the_scope_open_when_its_launcher_began():
    """kernel_ms_by_scope: each host event's own kernels (not its children's) summed under the innermost
    scope open at the event's start; an event outside every scope is charged apart; per step."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    from core.perf import kernel_ms_by_scope

    def ev(name, a, b, kernels=(), dev=DeviceType.CPU):
        return NS(name=name, time_range=NS(start=a, end=b), device_type=dev,
                  kernels=[NS(duration=d) for d in kernels])

    events = [ev("lift3d.a", 0, 1000), ev("lift3d.inner", 200, 300), ev("lift3d.b", 1000, 2000),
              ev("aten::conv", 10, 50, [400, 600]), ev("aten::cudnn_conv", 12, 40),  # the launcher's own only
              ev("triton_poi_fused", 250, 260, [1000]), ev("aten::mm", 1500, 1600, [2000]),
              ev("aten::copy_", 2500, 2600, [100]), ev("k", 0, 5000, [], DeviceType.CUDA)]
    assert kernel_ms_by_scope(events, steps=2) == {"lift3d.b": 1.0, "lift3d.inner": 0.5, "lift3d.a": 0.5,
                                                   "(outside the scopes)": 0.05}


def _smi_csv(path, reasons_header="clocks_event_reasons.active"):
    """A log in nvidia-smi's --format=csv: units in the values, the clock-event reasons in hex."""
    rows = [("05:02:11.188", 345, 78.9, 0, 0x1), ("05:02:11.438", 1980, 120.5, 60, 0x0),
            ("05:02:11.688", 1800, 650.0, 100, 0x4), ("05:02:11.938", 1830, 655.0, 99, 0x4),
            ("05:02:12.188", 1980, 300.0, 95, 0x0), ("05:02:12.438", 345, 80.0, 0, 0x1)]
    path.write_text(f"timestamp, clocks.current.sm [MHz], power.draw [W], utilization.gpu [%], {reasons_header}\n" +
                    "".join(f"2026/12/01 {t}, {mhz} MHz, {w:.2f} W, {u} %, 0x{r:016x}\n" for t, mhz, w, u, r in rows))
    return path


def test_clock_logs_are_read_by_their_header_and_summed_over_the_busy_samples(tmp_path):
    """core.perf.read_smi / clock_summary: columns found by name (the older driver's name for the
    reasons too); only the busy samples count, and the power cap's bit (0x4) gives the share of them
    it held the clocks down. Session 30's H200 log: the textual inversion's 80 steps power-capped."""
    from core.perf import clock_summary, read_smi

    for name in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):
        read = read_smi(_smi_csv(tmp_path / "log.csv", name))
        assert [r["t"] for r in read] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25] and read[2]["reasons"] == 4
        assert clock_summary(read) == {"samples": 6, "busy_samples": 4, "sm_mhz_median": 1905.0, "power_w_median": 475.0,
                                       "util_median": 97.0, "power_capped_share": 0.5}
    assert clock_summary(read, busy=101) == {"samples": 6, "busy_samples": 0}
    h200 = clock_summary(read_smi(Path(__file__).parent.parent / "reports" / "speed" / "h200_ti_s30_clocks.csv"))
    assert h200["power_capped_share"] > 0.9 and 1700 < h200["sm_mhz_median"] < 1980


def test_gpu_clocks_samples_its_device_by_uuid_and_gives_nothing_without_a_gpu(tmp_path, monkeypatch):
    """core.perf.GpuClocks runs nvidia-smi for its device's UUID (whatever CUDA_VISIBLE_DEVICES makes of
    the index) with the query read_smi reads, and sums up what it wrote; off a GPU it starts nothing.
    Here a stand-in nvidia-smi on PATH writes a log and the arguments it was given."""
    import stat

    from core import perf

    args = tmp_path / "args.txt"
    log = _smi_csv(tmp_path / "canned.csv")
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" > {args}\ncat {log}\nexec sleep 30\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")

    with perf.GpuClocks("cpu") as off:
        pass
    assert off.rows is None and off.summary is None and not args.exists()

    monkeypatch.setattr(perf, "smi_id", lambda device: "GPU-0c2a")
    with perf.GpuClocks("cpu", tmp_path / "kept.csv", every_ms=100) as on:
        for _ in range(100):  # until the stand-in has written its log
            if (tmp_path / "kept.csv").exists() and (tmp_path / "kept.csv").read_text().count("\n") >= 7:
                break
            time.sleep(0.05)
    assert args.read_text().split() == [f"--query-gpu={perf.SMI_QUERY}", "--format=csv", "-lms=100", "-i", "GPU-0c2a"]
    assert on.summary == {"samples": 6, "busy_samples": 4, "sm_mhz_median": 1905.0, "power_w_median": 475.0, "util_median": 97.0,
                          "power_capped_share": 0.5}
    with perf.GpuClocks("cpu") as temporary:  # no path: a temporary log, removed afterwards
        for _ in range(100):
            if temporary.path is not None and temporary.path.exists() and temporary.path.read_text().count("\n") >= 7:
                break
            time.sleep(0.05)
    assert temporary.summary is not None and not temporary.path.exists()
