"""What every task shares: params from a plain dict, and the stale-output check."""
from __future__ import annotations

from pathlib import Path

from core.params import Params

# the parameter sections each step reads (its cache key covers these and nothing else)
PREPARE_SECTIONS = ("segment", "depth", "models")
TI_SECTIONS = ("textual_inversion", "sd", "segment", "models", "seed", "device")
# the stages render the novel views that evaluation scores: their number is a stage input too
COARSE_SECTIONS = ("method", "seed", "device", "camera", "coarse", "guidance", "sd", "zero123", "prompt",
                   "textual_inversion", "detector", "models", "segment", "evaluate.novel_views")
FINE_SECTIONS = COARSE_SECTIONS + ("fine",)
EVALUATE_SECTIONS = ("evaluate", "models", "method", "device")


def as_params(params: dict) -> Params:
    return Params.model_validate(params)


def complete(out_dir: str | Path, marker: str = "result.json") -> bool:
    """A stage folder is complete when its marker file (written last) exists."""
    return (Path(out_dir) / marker).is_file()
