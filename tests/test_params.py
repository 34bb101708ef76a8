import pytest

from core.params import ParamsError, load_params, preset_names


def test_base_is_magic123_paper_settings():
    p = load_params()
    assert p.coarse.iters == 5000 and p.fine.iters == 5000
    assert p.coarse.lr == 1e-3 and p.coarse.resolution == 128
    assert p.fine.resolution == 8 * p.coarse.resolution
    assert (p.guidance.coarse.lambda_2d, p.guidance.coarse.lambda_3d) == (1.0, 40.0)
    assert (p.guidance.fine.lambda_2d, p.guidance.fine.lambda_3d) == (0.001, 0.01)
    assert p.sd.guidance_scale == 100 and p.zero123.guidance_scale == 5
    assert tuple(p.sd.t_range) == (0.2, 0.6)
    assert (p.camera.ref_polar, p.camera.ref_azimuth, p.camera.radius, p.camera.fovy) == (90, 0, 1.8, 40)
    assert (p.coarse.losses.rgb, p.coarse.losses.mask) == (5.0, 0.5)


def test_presets_exist_and_validate():
    names = preset_names()
    for required in ("magic123", "smoke", "tiny", "consistent123", "magic123-2d", "magic123-3d"):
        assert required in names
    for name in names:
        load_params(name)
    c = load_params("consistent123")
    # the released code's reference view every 4th iteration (docs/fidelity.md item 12; paper: p = 0.25)
    assert c.guidance.kind == "dynamic" and c.detector.enabled and c.camera.ref_prob is None
    assert c.camera.ref_every == 4
    assert load_params("magic123-2d").guidance.coarse.lambda_3d == 0.0
    assert load_params("magic123-3d").guidance.coarse.lambda_2d == 0.0


def test_overrides_are_typed_and_applied():
    p = load_params("smoke", ["coarse.iters=7", "camera.polar_range=[60, 120]", "guidance.kind=oracle"])
    assert p.coarse.iters == 7 and tuple(p.camera.polar_range) == (60, 120) and p.guidance.kind == "oracle"


@pytest.mark.parametrize(
    "override, key",
    [("coarse.iterz=5", "coarse.iterz"), ("nonsense=1", "nonsense"), ("coarse.iters=many", "coarse.iters"),
     ("guidance.kind=magic", "guidance.kind"), ("coarse.grid.levels=0", "coarse.grid.levels")],
)
def test_bad_keys_name_the_key(override, key):
    with pytest.raises(ParamsError) as e:
        load_params("smoke", [override])
    assert f"'{key}'" in str(e.value)


def test_unknown_preset_lists_known():
    with pytest.raises(ParamsError, match="unknown preset 'nope'.*smoke"):
        load_params("nope")


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("coarse:\n  iters: 3\n  itres: 4\n")
    with pytest.raises(ParamsError, match="unknown key 'coarse.itres'"):
        load_params(path=f)


def test_digest_changes_with_values():
    assert load_params("smoke").digest() != load_params("smoke", ["seed=1"]).digest()
    assert load_params("smoke").digest() == load_params("smoke").digest()


def test_tiny_extends_smoke():
    t, s = load_params("tiny"), load_params("smoke")
    assert t.models.tiny and t.coarse.iters == 8 and t.coarse.lr == s.coarse.lr and t.coarse.grid == s.coarse.grid


def test_cuda_allocator_expandable_segments_unless_the_user_configured_it():
    from core.params import configure_cuda_allocator

    p = load_params("smoke")
    env = {}
    assert configure_cuda_allocator(p, env) == "expandable_segments:True"
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    assert configure_cuda_allocator(p, mine) is None and mine == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    off = {}
    assert configure_cuda_allocator(load_params("smoke", ["cuda_expandable_segments=false"]), off) is None and off == {}


def test_cudnn_benchmark_is_a_how_not_what_switch_off_by_default():
    """params.cudnn_benchmark (issue 15): resolve_device sets torch.backends.cudnn.benchmark from it
    (off unless asked: timed algorithm choices can change a convolution's last bits run to run); a
    step's digest leaves it out, as the other speed switches."""
    import torch

    from core.params import HOW_NOT_WHAT, resolve_device

    before = torch.backends.cudnn.benchmark
    try:
        assert load_params("smoke").cudnn_benchmark is False
        resolve_device(load_params("smoke", ["device=cpu", "cudnn_benchmark=true"]))
        assert torch.backends.cudnn.benchmark is True
        resolve_device(load_params("smoke", ["device=cpu"]))
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before
    assert "cudnn_benchmark" in HOW_NOT_WHAT


def test_cpu_threads_come_from_the_params_then_omp_num_threads_then_the_cores(monkeypatch):
    import os

    import torch

    from core.params import env_threads, resolve_device

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert env_threads() == 1
        resolve_device(load_params("tiny"))
        assert torch.get_num_threads() == 1
        resolve_device(load_params("tiny", ["cpu_threads=2"]))  # the params win over the environment
        assert torch.get_num_threads() == 2
        for bad in ("", "0", "two"):
            monkeypatch.setenv("OMP_NUM_THREADS", bad)
            assert env_threads() is None
        monkeypatch.delenv("OMP_NUM_THREADS")
        resolve_device(load_params("tiny"))
        assert torch.get_num_threads() == (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)


def test_speed_and_saving_settings_leave_the_step_digests_alone():
    """HOW_NOT_WHAT (compile modes, layouts, backends, checkpoint cadence): a run made with one
    value resumes, and a cached step is reused, under another; each key names a real setting; a
    setting of the method in the same sections still changes the digest."""
    from core.params import HOW_NOT_WHAT, STEP_READS, _pick, step_digest

    base = load_params("magic123")
    tree = base.to_dict()
    for key in HOW_NOT_WHAT:  # a real setting (some are null by default: models.compile_cache)
        parent, _, last = key.rpartition(".")
        assert last in (_pick(tree, parent) if parent else tree), key
    other = load_params("magic123", {"sd.compile": "none", "sd.channels_last": True, "sd.vae_compile": "default",
                                     "zero123.compile": "reduce-overhead", "textual_inversion.overlap": False,
                                     "textual_inversion.prefetch": False,
                                     "textual_inversion.checkpoint_every": 250, "coarse.grid.backend": "torch",
                                     "coarse.checkpoint_every": 7, "fine.rasterizer": "torch",
                                     "coarse.normals_recompute": True, "models.compile_cache": "/tmp/compile.bin"})
    assert other.digest() != base.digest()  # the whole record still tells them apart
    for step in STEP_READS:
        assert step_digest(other, step) == step_digest(base, step), step
    method = load_params("magic123", {"sd.guidance_scale": 50})
    assert step_digest(method, "textual_inversion") != step_digest(base, "textual_inversion")
    assert step_digest(method, "coarse") != step_digest(base, "coarse")
