"""Which model each part of lift3d loads: the one place where "use the tiny test models" is decided.

Every model name in params (sd.model, zero123.model, detector/evaluate CLIP, depth.model,
segment.model) is read here. With `params.models.tiny` the tiny random models of the same classes
(core.testmodels) stand in, built once into the tiny-model root; otherwise the name is returned as
the params give it (a hub id or a local folder). The loaders themselves (core.models.loader,
open_clip, rembg) never know which kind they get.

A prior named `analytic` or `analytic:OBJ+OBJ…` (`--set sd.model=analytic:torus+blocks`, OBJ a
procedural object or a mesh file) is an exact denoiser of those known objects
(core.testmodels.analytic), built once into the tiny-model root for the resolution and cameras
of the params; it wins over `models.tiny` for that prior.
"""
from __future__ import annotations

from typing import Any, Optional


def uses_tiny_models(params: Any) -> bool:
    return bool(params.models.tiny)


def uses_analytic_prior(params: Any, which: str) -> bool:
    """Whether params.<which>.model ('sd' or 'zero123') names an analytic prior."""
    name = getattr(params, which).model
    return name == "analytic" or name.startswith("analytic:")


def prior_model(params: Any, which: str) -> str:
    """The folder or hub id of the 'sd' or 'zero123' prior."""
    if uses_analytic_prior(params, which):
        from core.testmodels.analytic import ensure_analytic_prior

        return ensure_analytic_prior(params, which)
    if uses_tiny_models(params):
        from core.testmodels import tiny_root
        from core.testmodels.priors import ensure_tiny_models

        return ensure_tiny_models(tiny_root(params))[which]
    return getattr(params, which).model


def clip_model(params: Any, which: str) -> tuple[str, Optional[str]]:
    """(open_clip model name or config JSON, pretrained tag or checkpoint) for 'detector' or 'evaluate'."""
    if uses_tiny_models(params):
        from core.testmodels.judges import ensure_tiny_judges

        j = ensure_tiny_judges(params=params)
        return str(j.clip_config), str(j.clip_checkpoint)
    section = getattr(params, which)
    return section.clip_model, section.clip_pretrained


def depth_model(params: Any) -> str:
    if uses_tiny_models(params):
        from core.testmodels.judges import ensure_tiny_judges

        return str(ensure_tiny_judges(params=params).dpt)
    return params.depth.model


def segment_model(params: Any, model: Optional[str] = None) -> str:
    """The rembg model name or ONNX path (`model` overrides params.segment.model)."""
    model = model or params.segment.model
    if uses_tiny_models(params) and model == "u2net":
        from core.testmodels.judges import ensure_tiny_judges

        return str(ensure_tiny_judges(params=params).rembg_onnx)
    return model


def describe(params: Any, which: str) -> str:
    """A short label of the model in use, for logs and records."""
    if which in ("sd", "zero123") and uses_analytic_prior(params, which):
        return getattr(params, which).model
    if uses_tiny_models(params):
        return f"tiny {which}"
    return {"depth": lambda: params.depth.model, "segment": lambda: params.segment.model}.get(
        which, lambda: str(getattr(params, which)))()
