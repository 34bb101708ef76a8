"""Novel-view guidance: a batch of renders and their cameras in, a loss and diagnostics out."""
from core.guidance.base import Guidance, GuidanceOutput, RenderBatch

__all__ = ["Guidance", "GuidanceOutput", "RenderBatch"]
