"""scripts/fine_mesh_bench.py on the CPU at tiny settings: one row per face target, the face count
dialled up with the displacement's frequency, every timed part a positive finite number, the
iteration the sum of its parts, and the plot written."""
import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_fine_mesh_bench_cpu(tmp_path, capsys):
    bench = load("fine_mesh_bench")
    out = tmp_path / "bench.json"
    # 1,000 is below the plain sphere's count at tet grid 24³ (~2.7k faces), so it gets k = 0; 8,000 needs bumps
    rc = bench.main(["--device", "cpu", "--tet-resolution", "24", "--resolution", "64", "--iters", "1", "--warmup", "1",
                     "--faces", "8000,1000", "--profile", "1", "--out", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["rasterizer"] == "torch" and r["resolution"] == 64 and r["tet_resolution"] == 24
    rows = r["rows"]
    assert [row["target_faces"] for row in rows] == [1000, 8000]
    lo, hi = rows
    assert lo["frequency"] == 0.0 and hi["frequency"] > 0.0
    assert 0 < lo["faces"] < hi["faces"] and lo["verts"] > 0
    assert abs(hi["faces"] - 8000) / 8000 < 0.15, hi["faces"]
    for row in rows:
        assert row["faces_timed"] == row["faces"]  # the SDF was put back after each optimiser step
        it = row["iteration_ms"]
        for part in (*bench.ITERATION_PARTS, "iteration"):
            assert math.isfinite(it[part]) and it[part] > 0, (part, it[part])
        assert math.isclose(sum(it[p] for p in bench.ITERATION_PARTS), it["iteration"], rel_tol=1e-3)
        alone = row["alone_ms"]
        # torch backend: its sub-parts; the tensors' coverage pass a second time only beside the Triton one (GPU)
        assert r["coverage"] == "torch"
        assert set(alone) == set(bench.ALONE_PARTS) | set(bench.ALONE_SUBPARTS) - {"rasterize.coverage_torch"}
        for part in bench.ALONE_PARTS:
            for kind in ("forward", "backward"):
                assert math.isfinite(alone[part][kind]) and alone[part][kind] > 0, (part, kind, alone[part])
        for part in set(bench.ALONE_SUBPARTS) & set(alone):
            assert math.isfinite(alone[part]["forward"]) and alone[part]["forward"] > 0 and alone[part]["backward"] is None
        assert 0 < row["view_coverage"] < 1
    for row in rows:  # --profile: the profiler's table of one iteration at each face count
        table = (tmp_path / f"bench_profile_{row['faces']}.txt").read_text()
        assert f"1 iterations at {row['faces']:,} faces" in table and "Self CPU" in table and "aten::" in table
    png = out.with_suffix(".png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "ms per part of one iteration" in printed and f"{hi['faces']:,}" in printed
    png.unlink()
    assert bench.main(["--plot", str(out)]) == 0 and png.is_file()  # --plot redraws from the JSON alone
