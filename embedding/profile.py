"""What page image size the configured model consumes.

The splitter renders each page once, at the size the model will actually use and
no larger: rendering bigger only costs render time, bytes on Kafka and resize time
in the embedder (field notes: ColQwen2 preprocessing costs more than rendering).

Imports nothing heavy (no torch, no transformers): the splitter loads this module.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from colstream.embedding.families import FAMILIES, QWEN_VL_FAMILIES, family_spec
from colstream.infra.settings import ModelSettings
from colstream.infra.vectorstore import IndexModel

Family = Literal[
    "colqwen2", "colqwen2_5", "colqwen3", "colqwen3_5", "colpali", "colidefics3", "colmodernvbert", "colgemma3"
]

DEFAULT_MODEL_IDS: dict[str, str] = {name: spec.default_model_id for name, spec in FAMILIES.items()}

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


# Qwen3-VL and Qwen3.5: 16 px patches merged 2x2 = 32x32 px per token.
DEFAULT_QWEN3_VL_PATCH_SIZE = 16
# SmolVLM / ModernVBERT: pages are resized to this longest edge, then tiled.
DEFAULT_IDEFICS3_LONGEST_EDGE = 2048
# Gemma 3's SigLIP encoder: every page is squashed to 896 x 896.
DEFAULT_GEMMA3_IMAGE_SIZE = 896


def render_target_for(model: ModelSettings) -> RenderTarget:
    spec = family_spec(model.family)
    if model.family in QWEN_VL_FAMILIES:
        default_patch = DEFAULT_QWEN3_VL_PATCH_SIZE if model.family in ("colqwen3", "colqwen3_5") else None
        patch_size, merge_size = _qwen2_vl_patch_and_merge(model_id_for(model), default_patch)
        token_side = patch_size * merge_size
        return RenderTarget(max_pixels=effective_max_visual_tokens(model) * token_side * token_side)
    if spec.token_cap == "fixed_square":
        # PaliGemma and Gemma 3 squash every page to a fixed square: a shorter side below
        # it would be upscaled (lost detail), anything above is downscaled away.
        default = DEFAULT_COLPALI_IMAGE_SIZE if model.family == "colpali" else DEFAULT_GEMMA3_IMAGE_SIZE
        return RenderTarget(min_side=_colpali_image_size(model_id_for(model), default))
    if spec.token_cap == "tiles":
        # The processor resizes the longer side to its longest edge and cuts tiles from
        # that: rendering larger is wasted.
        return RenderTarget(max_side=_idefics3_longest_edge(model_id_for(model)))
    raise ValueError(f"unknown model family {model.family!r}")


def _idefics3_longest_edge(name_or_path: str) -> int:
    size = _image_processor_config(_local_dir(name_or_path)).get("size")
    if isinstance(size, dict) and isinstance(size.get("longest_edge"), int):
        return int(size["longest_edge"])
    return DEFAULT_IDEFICS3_LONGEST_EDGE


def _qwen2_vl_patch_and_merge(name_or_path: str, default_patch: int | None = None) -> tuple[int, int]:
    image_processor = _image_processor_config(_local_dir(name_or_path))
    patch = image_processor.get("patch_size", default_patch or DEFAULT_QWEN2_VL_PATCH_SIZE)
    merge = image_processor.get("merge_size", DEFAULT_QWEN2_VL_MERGE_SIZE)
    return int(patch), int(merge)


def _colpali_image_size(name_or_path: str, default: int = DEFAULT_COLPALI_IMAGE_SIZE) -> int:
    size = _image_processor_config(_local_dir(name_or_path)).get("size")
    if isinstance(size, dict):
        sides = [v for k, v in size.items() if k in ("height", "width", "shortest_edge") and isinstance(v, int)]
        if sides:
            return max(sides)
    if isinstance(size, int):
        return size
    return default


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


# -- the identity an index records --------------------------------------------------------

# The projection to the multivector width: ``custom_text_proj`` in most families,
# ``linear`` in ColIdefics3. Its weight is [dim, hidden].
_PROJECTION_KEY = re.compile(r"(^|\.)(custom_text_proj|linear)\.weight$")
_SNAPSHOT_PART = re.compile(r"^[0-9a-f]{40}$")
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class ModelIdentityError(RuntimeError):
    """The checkpoint's dimension or revision cannot be read (missing files, hub unreachable)."""


def index_model_for(model: ModelSettings) -> IndexModel:
    """The model an index built with these settings belongs to, read from the checkpoint's
    files (config and safetensors headers) without loading any weights."""
    name_or_path = model_id_for(model)
    folder = _local_dir(name_or_path) or _cached_snapshot(name_or_path, model.revision)
    if folder is not None:
        dim = _dimension_from_headers(_safetensors_headers(folder), name_or_path)
        revision = _local_revision(folder) if _local_dir(name_or_path) else folder.name
        marker = _read_json(folder, _MARKER_FILE)
        random_weights = bool(marker.get("colstream_random_weights", False))
    else:
        dim = _dimension_from_hub(name_or_path, model.revision)
        revision, random_weights = model.revision or "main", False
    return IndexModel(
        family=model.family, model_id=name_or_path, revision=revision, dim=dim, random_weights=random_weights
    )


def model_settings_for_index(configured: ModelSettings, index: IndexModel | None) -> ModelSettings:
    """Settings that load the model ``index`` was built with (``configured`` supplies the
    device, batch sizes...). Without a recorded model the configured one is used."""
    if index is None or index.family == "unspecified":
        return configured
    if index.family == configured.family and index.model_id == model_id_for(configured):
        return configured
    revision = None if index.revision.startswith("local-") or index.revision == "main" else index.revision
    return configured.model_copy(update={"family": index.family, "name_or_path": index.model_id, "revision": revision})


def _local_revision(folder: Path) -> str:
    """A hub snapshot folder is named by its commit; any other folder by a digest of what
    defines its weights: the config and the safetensors headers (names, shapes, offsets)."""
    if _SNAPSHOT_PART.match(folder.name) and folder.parent.name == "snapshots":
        return folder.name
    digest = hashlib.sha256()
    for name in ("config.json", _MARKER_FILE):
        path = folder / name
        if path.is_file():
            digest.update(path.read_bytes())
    for header in _safetensors_headers(folder):
        digest.update(json.dumps(header, sort_keys=True).encode())
    return f"local-{digest.hexdigest()[:16]}"


def _safetensors_headers(folder: Path) -> list[dict[str, Any]]:
    headers = []
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _MAX_HEADER_BYTES:
                raise ModelIdentityError(f"{path}: safetensors header of {length} bytes is not plausible")
            headers.append(json.loads(handle.read(length)))
    return headers


def _dimension_from_headers(headers: list[dict[str, Any]], name_or_path: str) -> int:
    for header in headers:
        for key, entry in header.items():
            if _PROJECTION_KEY.search(key) and isinstance(entry, dict) and len(entry.get("shape", ())) == 2:
                return int(entry["shape"][0])
    raise ModelIdentityError(
        f"checkpoint {name_or_path!r} has no multivector projection (custom_text_proj / linear) "
        "in its safetensors files: is it a colpali-engine checkpoint?"
    )


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The hub cache's snapshot folder of ``repo_id`` when its config is cached there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:
        return None
    if isinstance(found, str):
        folder = Path(found).parent
        if any(folder.glob("*.safetensors")):
            return folder
    return None


def _dimension_from_hub(repo_id: str, revision: str | None) -> int:
    """Reads only the safetensors headers over HTTP (no weights are downloaded)."""
    try:
        from huggingface_hub import get_safetensors_metadata

        metadata = get_safetensors_metadata(repo_id, revision=revision)
    except Exception as exc:
        raise ModelIdentityError(
            f"cannot read the dimension of {repo_id!r} (revision {revision or 'main'}): {exc}. "
            "The Hugging Face hub may be unreachable: point model.name_or_path at a local copy"
        ) from exc
    headers = [
        {name: {"shape": info.shape} for name, info in file.tensors.items()}
        for file in metadata.files_metadata.values()
    ]
    return _dimension_from_headers(headers, repo_id)


def _read_json(folder: Path | None, name: str) -> dict[str, Any]:
    if folder is None:
        return {}
    try:
        data = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
