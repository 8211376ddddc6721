"""What page image size the configured model consumes.

The splitter renders each page once, at the size the model will actually use and
no larger: rendering bigger only costs render time, bytes on Kafka and resize time
in the embedder (field notes: ColQwen2 preprocessing costs more than rendering).

Imports nothing heavy (no torch, no transformers): the splitter loads this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from colstream.infra.settings import ModelSettings

Family = Literal["colqwen2", "colpali"]

DEFAULT_MODEL_IDS: dict[str, str] = {
    "colqwen2": "vidore/colqwen2-v1.0",
    "colpali": "vidore/colpali-v1.2",
}

# Qwen2-VL: 14 px patches merged 2x2 into one visual token = 28x28 px per token.
DEFAULT_QWEN2_VL_PATCH_SIZE = 14
DEFAULT_QWEN2_VL_MERGE_SIZE = 2
# PaliGemma-3B-448 behind vidore/colpali-v1.2.
DEFAULT_COLPALI_IMAGE_SIZE = 448

_MARKER_FILE = "colstream_checkpoint.json"  # written by colstream.embedding.tiny


@dataclass(frozen=True)
class RenderTarget:
    """Render so the image has at most ``max_pixels`` pixels, a shorter side of at
    least ``min_side`` and a longer side of at most ``max_side``; None = no constraint."""

    max_pixels: int | None = None
    min_side: int | None = None
    max_side: int | None = None


def default_model_id(family: Family | str) -> str:
    try:
        return DEFAULT_MODEL_IDS[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(DEFAULT_MODEL_IDS)}") from None


def model_id_for(model: ModelSettings) -> str:
    return model.name_or_path or default_model_id(model.family)


def effective_max_visual_tokens(model: ModelSettings) -> int:
    """The configured ColQwen2 visual-token cap, lowered to the checkpoint's own cap
    when the checkpoint declares a smaller one (the tiny test checkpoints do)."""
    cap = model.max_visual_tokens
    marker = _read_json(_local_dir(model_id_for(model)), _MARKER_FILE)
    checkpoint_cap = marker.get("max_visual_tokens") if marker else None
    if isinstance(checkpoint_cap, int) and checkpoint_cap > 0:
        cap = min(cap, checkpoint_cap)
    return cap


def render_target_for(model: ModelSettings) -> RenderTarget:
    if model.family == "colqwen2":
        patch_size, merge_size = _qwen2_vl_patch_and_merge(model_id_for(model))
        token_side = patch_size * merge_size
        return RenderTarget(max_pixels=effective_max_visual_tokens(model) * token_side * token_side)
    if model.family == "colpali":
        # PaliGemma squashes every page to a fixed square: a shorter side below it
        # would be upscaled (lost detail), anything above is downscaled away.
        return RenderTarget(min_side=_colpali_image_size(model_id_for(model)))
    raise ValueError(f"unknown model family {model.family!r}")


def _qwen2_vl_patch_and_merge(name_or_path: str) -> tuple[int, int]:
    image_processor = _image_processor_config(_local_dir(name_or_path))
    patch = image_processor.get("patch_size", DEFAULT_QWEN2_VL_PATCH_SIZE)
    merge = image_processor.get("merge_size", DEFAULT_QWEN2_VL_MERGE_SIZE)
    return int(patch), int(merge)


def _colpali_image_size(name_or_path: str) -> int:
    size = _image_processor_config(_local_dir(name_or_path)).get("size")
    if isinstance(size, dict):
        sides = [v for k, v in size.items() if k in ("height", "width", "shortest_edge") and isinstance(v, int)]
        if sides:
            return max(sides)
    if isinstance(size, int):
        return size
    return DEFAULT_COLPALI_IMAGE_SIZE


def _local_dir(name_or_path: str) -> Path | None:
    path = Path(name_or_path).expanduser()
    return path if path.is_dir() else None


def _image_processor_config(folder: Path | None) -> dict[str, Any]:
    # Older checkpoints keep the image processor in preprocessor_config.json;
    # transformers 5 writes it inside processor_config.json.
    legacy = _read_json(folder, "preprocessor_config.json")
    if legacy:
        return legacy
    nested = _read_json(folder, "processor_config.json").get("image_processor")
    return nested if isinstance(nested, dict) else {}


def _read_json(folder: Path | None, name: str) -> dict[str, Any]:
    if folder is None:
        return {}
    try:
        data = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
