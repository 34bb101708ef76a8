"""The `lift3d` command line.

Every command takes `--preset NAME` and repeated `--set key=value` (see params.yaml). Handlers are
imported when their command runs, so `lift3d --help` stays quick. An error of the user's (a bad
input, a missing model: core.errors.Lift3DError) is one line `lift3d: error: ...` and exit 2, also
from inside a Prefect flow; a failed step of a flow is one line and exit 1. Tracebacks only with -v.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _add_params_args(p: argparse.ArgumentParser, default_preset: str | None = "magic123") -> None:
    g = p.add_argument_group("parameters")
    g.add_argument("--preset", default=default_preset, help=f"a preset from params.yaml (default: {default_preset})")
    g.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one parameter, e.g. --set coarse.iters=500 (repeatable; the value is read as YAML)",
    )
    g.add_argument("--params", type=Path, default=None, help="a params.yaml other than the repository's")


def _add_step_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step-timeout", type=float, default=0, metavar="SECONDS",
                   help="end an attempt of the coarse or fine stage that runs longer, between two iterations "
                        "(0: no limit); it is retried once, from its checkpoint")


def _add_scale_out(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale-out (Dask; each worker loads the priors once)")
    g.add_argument("--gpus", type=int, default=None, help="one dask-cuda worker per GPU, N GPUs (the gpu extra)")
    g.add_argument("--per-gpu", type=int, default=1, metavar="K",
                   help="with --gpus N: K worker processes on each GPU, each with its own priors (default 1, dask-cuda's; "
                        "2 on an H200 overlaps compiling and exports, up to 1.3–1.7× the cold or short assets an hour, "
                        "but ~1.0× at the paper's counts: one worker keeps the card ~88%% busy; reports/speed session 28)")
    g.add_argument("--workers", type=int, default=None, help="N local Dask worker processes of one thread (CPU)")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="an existing Dask scheduler, e.g. tcp://host:8786 (workers on several hosts)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lift3d",
        description="One photo of an object in, a textured 3D mesh out (Magic123 / Consistent123).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # -- the whole pipeline through Prefect ------------------------------------------------------
    p = sub.add_parser("generate", help="image → textured mesh: prepare, coarse, fine, evaluate (a Prefect flow)",
                       description="Run the whole pipeline on one image as a Prefect flow of cached tasks.")
    p.add_argument("image", type=Path, help="the input photo (RGB or RGBA)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--depth", type=Path, default=None, help="a depth map to use as is (brighter is nearer)")
    p.add_argument("--embeds", type=Path, default=None, help="a learned_embeds.bin to use as is")
    p.add_argument("--text", default=None, help="a plain description of the object (the prompt)")
    _add_step_timeout(p)
    _add_params_args(p)
    p.set_defaults(handler="flows.generate:cli_generate")

    p = sub.add_parser("benchmark", help="run a method over a dataset folder and write a report (a Prefect flow)",
                       description="Generate every asset of a dataset (NeRF4, RealFusion15 or any folder of "
                                   "object folders), evaluate them and write reports/.")
    p.add_argument("dataset", type=Path, help="a folder of object folders, each with rgba.png")
    p.add_argument("--out", type=Path, required=True, help="output folder: runs go to OUT/DATASET/OBJECT")
    p.add_argument("--report", type=Path, default=None,
                   help="report folder: report.md, per_asset.csv, summary.json, plots (default: OUT/DATASET/report)")
    p.add_argument("--limit", type=int, default=0, help="only the first N objects (0: all)")
    _add_scale_out(p)
    _add_step_timeout(p)
    _add_params_args(p)
    p.set_defaults(handler="flows.benchmark:cli_benchmark")

    p = sub.add_parser("generate-many", help="many photos → assets, resumably, with a manifest (a Prefect flow)",
                       description="Generate an asset from each photo (photos, folders, quoted globs or list files "
                                   "of paths; plain photos are segmented) into OUT/NAME, and write OUT/manifest.csv "
                                   "(+ .parquet): status, step and error, seconds, metrics, output paths, worker and "
                                   "prior loads per asset. A rerun skips the assets that are done.")
    p.add_argument("photos", nargs="+", help="photos, folders of photos, quoted globs ('dir/**/*.jpg') or list files")
    p.add_argument("--out", type=Path, required=True, help="output folder: OUT/NAME per asset, OUT/manifest.csv")
    p.add_argument("--limit", type=int, default=0, help="run at most N of the assets still to do (0: all)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="only shard I of N (1-based; every N-th asset by sorted name): one per submitting host")
    _add_scale_out(p)
    _add_step_timeout(p)
    _add_params_args(p)
    p.set_defaults(handler="flows.generate_many:cli_generate_many")

    p = sub.add_parser("schedule", help="serve the benchmark flow on a cron schedule (needs a Prefect server)",
                       description="Register and serve a scheduled benchmark deployment, e.g. nightly.")
    p.add_argument("dataset", type=Path, help="a folder of object folders, each with rgba.png")
    p.add_argument("--out", type=Path, required=True, help="output folder of every scheduled run")
    p.add_argument("--cron", default="0 2 * * *", help='cron schedule (default: "0 2 * * *", nightly at 02:00)')
    p.add_argument("--limit", type=int, default=0, help="only the first N objects (0: all)")
    _add_params_args(p)
    p.set_defaults(handler="flows.schedules:cli_schedule")

    # -- single steps ----------------------------------------------------------------------------
    p = sub.add_parser("prepare", help="segment and estimate depth: IMAGE → rgba.png, mask.png, depth.png",
                       description="Segment the object (rembg), recentre it, and estimate the reference depth (DPT).")
    p.add_argument("image", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--depth", type=Path, default=None, help="a depth map to use as is")
    _add_params_args(p)
    p.set_defaults(handler="flows.inputs:cli_prepare")

    p = sub.add_parser("coarse", help="the coarse stage: a NeRF from one image",
                       description="Optimise the coarse NeRF (Magic123 §2.1.1) and export its mesh. "
                                   "Resumes from DIR/checkpoint.pt when one is there.")
    p.add_argument("image", type=Path, help="an RGBA image (alpha = foreground) or an RGB photo to segment")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--depth", type=Path, default=None, help="the reference depth map (brighter is nearer)")
    p.add_argument("--embeds", type=Path, default=None, help="a learned_embeds.bin to use as is")
    p.add_argument("--text", default=None, help="a plain description of the object")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    _add_params_args(p)
    p.set_defaults(handler="flows.coarse:cli_coarse")

    p = sub.add_parser("refine", help="the fine stage: DMTet refinement of a coarse checkpoint, textured mesh export",
                       description="Refine a coarse NeRF checkpoint into a DMTet mesh (Magic123 §2.1.2) and export "
                                   "OBJ+MTL+PNG, GLB and a turntable.")
    p.add_argument("checkpoint", type=Path, help="a coarse checkpoint (coarse/checkpoint.pt)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--image", type=Path, default=None,
                   help="the reference image (default: reference_rgba.png beside the checkpoint)")
    p.add_argument("--depth", type=Path, default=None, help="the reference depth map (brighter is nearer)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    _add_params_args(p, default_preset=None)
    p.set_defaults(handler="flows.fine:cli_refine")

    p = sub.add_parser("evaluate", help="PSNR / LPIPS at the reference view, CLIP similarity of novel views",
                       description="Evaluate a run folder the way the papers do; writes RUN_DIR/metrics.json.")
    p.add_argument("run_dir", type=Path)
    _add_params_args(p, default_preset=None)
    p.set_defaults(handler="flows.evaluate:cli_evaluate")

    p = sub.add_parser("report", help="tables, plots and a gallery from benchmark results",
                       description="Collect metrics.json files under RESULTS into reports/.")
    p.add_argument("results", type=Path)
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.set_defaults(handler="flows.evaluate:cli_report")

    # -- benchmarks of the machinery -------------------------------------------------------------
    bench = sub.add_parser("bench", help="benchmarks of the machinery (oracle reconstruction, speed)")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    p = bsub.add_parser("oracle", help="reconstruct procedural objects under oracle guidance; writes DIR/oracle.json",
                        description="Oracle-guided reconstruction of the procedural test objects: PSNR and mask IoU "
                                    "at views the loop never sampled (and Chamfer distance for --stage fine).")
    p.add_argument("--stage", choices=["coarse", "fine"], default="coarse")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--objects", nargs="*", default=None,
                   help="procedural object names or textured mesh files (OBJ, GLB, …) (default: the procedural ones)")
    _add_params_args(p, default_preset="smoke")
    p.set_defaults(handler="flows.bench:cli_bench_oracle")

    p = bsub.add_parser("analytic", help="coarse + fine through the real SDS path with exact analytic priors of known "
                                         "objects; writes DIR/analytic.json",
                        description="The preset's guidance (SDS, CFG, w(t), cc_projection, λ's) with analytic Stable "
                                    "Diffusion and Zero-1-to-3 (exact denoisers of the objects given): novel-view PSNR, "
                                    "mask IoU and Chamfer distance at the oracle bench's held-out views.")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--objects", nargs="*", default=None,
                   help="procedural object names or textured mesh files (OBJ, GLB, …) (default: the procedural ones)")
    _add_params_args(p, default_preset="smoke")
    p.set_defaults(handler="flows.bench:cli_bench_analytic")

    p = bsub.add_parser("speed", help="a whole asset's time and peak memory with full-size priors; writes DIR/speed.json",
                        description="Time a whole asset (textual inversion, coarse, fine, export) as `generate` runs "
                                    "it, with the real architectures at full size and random weights (--stage asset, "
                                    "the default; --set coarse.iters=N etc. shorten it), or only the coarse iteration "
                                    "with its priors in isolation (--stage coarse).")
    p.add_argument("--stage", choices=["asset", "coarse"], default="asset")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--image", type=Path, default=None, help="the photo (default: the oracle torus at the reference view)")
    p.add_argument("--depth", type=Path, default=None, help="its depth map (with --image)")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="where the full-size random priors are written once and reused (default: OUT/models)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="--stage asset: torch.profiler over N iterations of each stage → OUT/profile_STAGE.txt")
    p.add_argument("--profile-after", type=int, default=0, metavar="K",
                   help="--profile: start each stage's window K iterations later (past the first guided "
                        "iterations' compiling and CUDA-graph captures: a steady window)")
    p.add_argument("--profile-by", default="op", metavar="op,shape,stack",
                   help="--profile: its tables, by operator, by its inputs' shapes, by the Python lines that called "
                        "it (comma-separated; shapes and stacks slow the window's host; default: %(default)s)")
    p.add_argument("--sync-audit", action="store_true",
                   help="--stage asset: count every host-device synchronisation by the line that caused it "
                        "→ OUT/sync_audit.txt (GPU; slows the run)")
    p.add_argument("--metrics-callback", action="store_true",
                   help="--stage asset: run the coarse and fine stages with a callback taking every iteration's "
                        "metrics, as the pipeline's Prefect tasks do (MLflow logging, progress): a real run's figures")
    p.add_argument("--stages", default=",".join(("textual_inversion", "coarse", "fine")), metavar="LIST",
                   help="--stage asset: the stages to run now, e.g. 'fine' to continue a run split across calls or "
                        "machines in the same OUT (the others' records are kept; a cut stage resumes)")
    p.add_argument("--assets", type=int, default=1, metavar="N",
                   help="--stage asset: the asset N times in this process (OUT, OUT/asset_2, …), as a worker that "
                        "generates many: the later ones find the priors loaded and compiled (what each further "
                        "asset costs)")
    p.add_argument("--compile-cache", type=Path, default=None, metavar="FILE",
                   help="--stage asset: torch.compile's artifacts read from FILE first (when it exists) and "
                        "written to it after, for a run on another machine of the same GPU and software")
    p.add_argument("--iters", type=int, default=20, help="--stage coarse: timed iterations after warm-up")
    p.add_argument("--ti-steps", type=int, default=23, help="--stage coarse: textual-inversion steps to time (3 warm-up)")
    p.add_argument("--compile", default="", metavar="MODES",
                   help="--stage coarse: also time the UNets under torch.compile, e.g. 'default,reduce-overhead'")
    p.add_argument("--tiny", action="store_true", help="tiny random priors instead (checks the code path on a CPU)")
    _add_params_args(p)
    p.set_defaults(handler="flows.bench_speed:cli_bench_speed")
    return parser


def _resolve(handler: str):
    import importlib

    mod, fn = handler.split(":")
    return getattr(importlib.import_module(mod), fn)


class _LogFormatter(logging.Formatter):
    """Log lines that name the Prefect task or flow run they come from ("coarse-1a2: Finished in state
    Cached(...)"); without -v, without tracebacks (the error ends the output as one line)."""

    def __init__(self, verbose: bool):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        brief = not self.verbose and (record.exc_info or record.exc_text or record.stack_info)
        if run or brief:
            record = logging.makeLogRecord(record.__dict__)
            if run:
                record.msg, record.args = f"{run}: {record.getMessage()}", None
            if brief:
                record.exc_info = record.exc_text = record.stack_info = None
        return super().format(record)


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormatter(verbose))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    if not verbose:  # one line per request to the Prefect API
        logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    from core.errors import Lift3DError
    from flows.failures import StepFailed

    try:
        rc = _resolve(args.handler)(args)
    except (Lift3DError, StepFailed) as e:
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"lift3d: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, Lift3DError) else 1
    except KeyboardInterrupt:
        print("lift3d: interrupted (a checkpoint, if any, lets the run resume)", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
