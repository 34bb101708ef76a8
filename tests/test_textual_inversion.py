"""Textual inversion: loading a benchmark learned_embeds.bin, learning a token, the file format."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import InputError
from core.guidance.sd import load_stable_diffusion
from core.guidance.textual_inversion import (augment_views, learn_token, load_learned_embeds, read_learned_embeds,
                                    save_learned_embeds)
from _tiny_priors import tiny_models

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "nerf4" / "chair" / "learned_embeds.bin"


@pytest.mark.skipif(not BENCH.is_file(), reason="benchmark files not present")
def test_benchmark_token_loads_into_a_768_wide_text_encoder():
    parts = load_stable_diffusion(tiny_models()["sd"], "cpu", torch.float32)
    raw = torch.load(BENCH, map_location="cpu")
    (token, vec), = raw.items()
    assert vec.shape == (768,) and vec.dtype == torch.float32
    tokens = load_learned_embeds(BENCH, parts.tokenizer, parts.text_encoder)
    assert tokens == [token]
    ids = parts.tokenizer(f"a photo of {token}", add_special_tokens=False).input_ids
    tid = parts.tokenizer.convert_tokens_to_ids(token)
    assert ids.count(tid) == 1  # one token, not split into pieces
    row = parts.text_encoder.get_input_embeddings().weight[tid]
    assert torch.equal(row, vec)


@pytest.mark.skipif(not BENCH.is_file(), reason="benchmark files not present")
def test_width_mismatch_is_a_clear_error(tmp_path):
    from core.testmodels.priors import build_tiny_sd

    narrow = build_tiny_sd(tmp_path / "sd32", text_width=32)
    parts = load_stable_diffusion(str(narrow), "cpu", torch.float32)
    with pytest.raises(InputError, match="768.*32 wide"):
        load_learned_embeds(BENCH, parts.tokenizer, parts.text_encoder)


def test_bad_file_is_input_error(tmp_path):
    bad = tmp_path / "learned_embeds.bin"
    torch.save([1, 2, 3], bad)
    with pytest.raises(InputError, match="dict"):
        read_learned_embeds(bad)
    with pytest.raises(InputError, match="not found"):
        read_learned_embeds(tmp_path / "missing.bin")


def test_learn_token_trains_only_its_row_and_saves_the_benchmark_format(tmp_path):
    parts = load_stable_diffusion(tiny_models()["sd"], "cpu", torch.float32)
    before = parts.text_encoder.get_input_embeddings().weight.detach().clone()
    rgb = torch.ones(3, 48, 48)
    rgb[:, 12:36, 16:32] = torch.tensor([0.8, 0.2, 0.1])[:, None, None]
    mask = torch.zeros(1, 48, 48)
    mask[:, 12:36, 16:32] = 1
    losses = []
    out = tmp_path / "learned_embeds.bin"
    learned = learn_token(parts, rgb, mask, token="<e>", initializer="object", steps=3, lr=5e-2, batch_size=2,
                          resolution=64, seed=0, out=out, callback=lambda s, l: losses.append(l))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    weight = parts.text_encoder.get_input_embeddings().weight
    assert weight.grad is None and not weight.requires_grad  # no gradient kept for the stages after it
    after = weight.detach()
    tid = parts.tokenizer.convert_tokens_to_ids("<e>")
    assert tid == before.shape[0]  # a new row
    assert torch.equal(after[:tid], before)  # every other row is unchanged
    init = before[parts.tokenizer.encode("object", add_special_tokens=False)[0]]
    assert not torch.allclose(after[tid], init)  # the new row moved away from its initializer
    saved = torch.load(out, map_location="cpu")
    assert list(saved) == ["<e>"] and saved["<e>"].dtype == torch.float32 and saved["<e>"].shape == (768,)
    assert torch.equal(saved["<e>"], learned["<e>"]) and torch.equal(saved["<e>"], after[tid])
    # and it round-trips into a fresh encoder
    fresh = load_stable_diffusion(tiny_models()["sd"], "cpu", torch.float32)
    load_learned_embeds(out, fresh.tokenizer, fresh.text_encoder)
    assert torch.equal(fresh.text_encoder.get_input_embeddings().weight[tid], saved["<e>"])
    save_learned_embeds(tmp_path / "again.bin", learned)
    assert torch.equal(read_learned_embeds(tmp_path / "again.bin")["<e>"], learned["<e>"])


def test_augmented_views_are_the_object_on_white():
    rgb = torch.ones(3, 40, 40)
    rgb[:, 10:30, 10:30] = 0.0
    mask = torch.zeros(1, 40, 40)
    mask[:, 10:30, 10:30] = 1
    views = augment_views(rgb, mask, 4, 32, torch.Generator().manual_seed(0))
    assert views.shape == (4, 3, 32, 32)
    assert (views[:, :, 0, 0] > 0.99).all()  # corners are background white
    dark = (views.mean(1) < 0.5).float().mean((1, 2))
    assert (dark > 0.2).all() and (dark < 0.9).all()  # the object is in every view, not filling it


def test_learn_token_times_its_parts_for_the_speed_profile(monkeypatch):
    """Under bench speed --profile (core.perf.SCOPE_TIMES a dict) each step's parts are timed: one call
    of each per step (gradient accumulation 1), the optimiser's once per step."""
    from core import perf

    parts = load_stable_diffusion(tiny_models()["sd"], "cpu", torch.float32)
    monkeypatch.setattr(perf, "SCOPE_TIMES", {})
    learn_token(parts, torch.ones(3, 32, 32), torch.ones(1, 32, 32), token="<e>", initializer="object", steps=2,
                batch_size=1, resolution=64, seed=0, progress=False)
    calls = {k: n for k, (n, t) in perf.SCOPE_TIMES.items()}
    assert calls == {f"lift3d.ti.{k}": 2 for k in ("augment", "vae_encode", "text_encoder", "unet", "backward",
                                                   "optimizer")}
    assert all(t >= 0 for n, t in perf.SCOPE_TIMES.values())


def test_only_the_full_batch_goes_through_the_compiled_encoder(monkeypatch):
    """textual_inversion.compile: the compiled step serves the full batches; the epoch's short last
    batch (repeats 3, batch 2: 2, 1, 2, 1) runs eagerly, so torch.compile sees one shape."""
    from core.guidance import sd

    seen = []

    def spy_compile(mode, device, **kw):  # stands in for torch.compile: records the batches it is handed
        def compiled(vae, images):
            seen.append(int(images.shape[0]))
            return sd.vae_moments(vae, images)
        return compiled

    monkeypatch.setattr(sd, "compile_vae_moments", spy_compile)
    parts = load_stable_diffusion(tiny_models()["sd"], "cpu", torch.float32)
    losses = []
    learn_token(parts, torch.ones(3, 32, 32), torch.ones(1, 32, 32), token="<e>", initializer="object", steps=4,
                batch_size=2, repeats=3, resolution=64, seed=0, progress=False, compile="default",
                callback=lambda s, l: losses.append(l))
    assert seen == [2, 2]  # steps 0 and 2; the short batches of steps 1 and 3 went eager
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


def test_stopped_and_started_again_it_learns_the_uninterrupted_row(tmp_path):
    """The checkpoint (every 2 steps here) holds the row, its AdamW moments and the random stream:
    a run killed after step 3 of 6 and started again in a fresh process (fresh text encoder) ends
    with the row, bit for bit, that one run of 6 steps learns; it trains only the 3 steps left. A
    checkpoint of other settings is not resumed."""
    rgb = torch.ones(3, 48, 48)
    rgb[:, 12:36, 16:32] = torch.tensor([0.8, 0.2, 0.1])[:, None, None]
    mask = torch.zeros(1, 48, 48)
    mask[:, 12:36, 16:32] = 1
    kw = dict(token="<e>", initializer="object", steps=6, lr=5e-2, batch_size=2, repeats=3, resolution=64, seed=0,
              progress=False, checkpoint_every=2, digest="abc")

    def fresh():
        return load_stable_diffusion(tiny_models()["sd"], "cpu", torch.float32)

    whole = learn_token(fresh(), rgb, mask, **kw)["<e>"]

    class Killed(Exception):
        pass

    def kill_after_3(step, loss):
        if step == 3:
            raise Killed

    ck = tmp_path / "checkpoint.pt"
    with pytest.raises(Killed):
        learn_token(fresh(), rgb, mask, checkpoint=ck, callback=kill_after_3, **kw)
    assert torch.load(ck, weights_only=True)["step"] == 2  # written after steps 1-2; step 3 (index 3) was cut
    stats, steps_run = {}, []
    resumed = learn_token(fresh(), rgb, mask, checkpoint=ck, stats=stats, callback=lambda s, l: steps_run.append(s),
                          **kw)["<e>"]
    assert steps_run == [2, 3, 4, 5] and stats["resumed_from"] == 2 and stats["steps_run"] == 4
    assert torch.equal(resumed, whole)
    assert torch.load(ck, weights_only=True)["step"] == 6
    # other settings: afresh (all 6 steps)
    steps_run.clear()
    learn_token(fresh(), rgb, mask, checkpoint=ck, callback=lambda s, l: steps_run.append(s),
                **{**kw, "digest": "other"})
    assert steps_run == list(range(6))


def test_tf32_matmuls_holds_only_inside_its_block():
    """textual_inversion.tf32: TF32 matmuls inside the step's block, the process's setting after it
    (also when the block raises); off, the block leaves a setting made elsewhere alone."""
    from core.perf import tf32_matmuls

    flag = torch.backends.cuda.matmul
    before = flag.allow_tf32
    try:
        flag.allow_tf32 = False
        with tf32_matmuls(True):
            assert flag.allow_tf32 is True
        assert flag.allow_tf32 is False
        with pytest.raises(RuntimeError), tf32_matmuls(True):
            raise RuntimeError("a step that fails")
        assert flag.allow_tf32 is False
        flag.allow_tf32 = True
        with tf32_matmuls(False):
            assert flag.allow_tf32 is True
        assert flag.allow_tf32 is True
    finally:
        flag.allow_tf32 = before


def test_tf32_matmuls_leaves_the_matmul_precision_as_it_found_it():
    """After the block torch's whole TF32 setting is as before, not only the old flag: in a process that
    never set it, `fp32_precision` stays 'none' (the flag set back to False alone makes it 'ieee': the
    same arithmetic, but another Inductor FX-graph cache key, so every graph compiled after the textual
    inversion missed the compile cache; session 42). A fresh process: this one's setting has been used."""
    import subprocess
    import sys

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision (before 2.9)")
    code = ("import torch; from core.perf import tf32_matmuls; m = torch.backends.cuda.matmul\n"
            "before = m.fp32_precision\n"
            "with tf32_matmuls(True): inside = (m.allow_tf32, m.fp32_precision)\n"
            "print(before, inside, m.fp32_precision, m.allow_tf32)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert out == ["none", "(True,", "'tf32')", "none", "False"], out


def test_views_made_ahead_on_a_thread_learn_the_same_row(tmp_path):
    """textual_inversion.prefetch: the next batch's views made on a thread while the step runs, their
    seed drawn where the plain loop draws it, so the same losses and row to the bit; across
    accumulation, the epoch's short batch, checkpoints (no views drawn ahead of one) and a resume."""
    rgb, mask = torch.ones(3, 48, 48), torch.zeros(1, 48, 48)
    rgb[:, 12:36, 16:32] = torch.tensor([0.8, 0.2, 0.1])[:, None, None]
    mask[:, 12:36, 16:32] = 1
    kw = dict(token="<e>", initializer="object", steps=5, lr=5e-2, batch_size=2, repeats=3, resolution=64, seed=0,
              progress=False, gradient_accumulation=2, checkpoint_every=2, digest="abc")

    def run(prefetch, stats=None, **more):
        seen = []
        parts = load_stable_diffusion(tiny_models()["sd"], "cpu", torch.float32)
        row = learn_token(parts, rgb, mask, prefetch=prefetch, callback=lambda s, l: seen.append((s, l)),
                          stats=stats, **{**kw, **more})["<e>"]
        return row, seen

    plain_stats, ahead_stats = {}, {}
    plain, plain_losses = run(False, plain_stats, checkpoint=tmp_path / "a.pt")
    ahead, ahead_losses = run(True, ahead_stats, checkpoint=tmp_path / "b.pt")
    # only the thread's run reports its views' seconds (views are made ahead for most micro-batches)
    assert "views_seconds" not in plain_stats and ahead_stats["views_seconds"] > 0
    assert 0 <= ahead_stats["views_wait_seconds"] < ahead_stats["loop_seconds"]
    assert [s for s, _ in plain_losses] == list(range(5)) and ahead_losses == plain_losses
    assert torch.equal(ahead, plain)
    # the checkpoints hold the same random stream (no seed drawn ahead of one)
    a, b = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    assert torch.equal(a["generator"], b["generator"]) and a["micro"] == b["micro"] == 10

    class Killed(Exception):
        pass

    def kill_at_3(step, loss):
        if step == 3:
            raise Killed

    parts = load_stable_diffusion(tiny_models()["sd"], "cpu", torch.float32)
    with pytest.raises(Killed):
        learn_token(parts, rgb, mask, prefetch=True, checkpoint=tmp_path / "c.pt", callback=kill_at_3, **kw)
    resumed, _ = run(True, checkpoint=tmp_path / "c.pt")
    assert torch.equal(resumed, plain)
