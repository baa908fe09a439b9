"""Object proposals for whole datasets: BING (OpenCV reference and our fast NumPy/OpenCV
implementation of the same model), ground truth and selective search; a resumable
multi-process driver writing a :class:`~dali_objcrop.boxstore.BoxStore`; recall
evaluation; BING training; the pretrained-model fetcher.

Conventions (shared by every method): boxes are float32 normalised ``[x1, y1, x2, y2]``,
0-based, with exclusive right/bottom edges (pixel box ``[x1, y1, x2, y2)`` divided by the
image size), best-first.
"""
from .common import PROPOSAL_MAX_SIDE, box_iou, load_for_proposals, nms_top_k

__all__ = ["PROPOSAL_MAX_SIDE", "box_iou", "load_for_proposals", "nms_top_k"]
