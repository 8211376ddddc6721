"""Load a checkpoint of any family in ``families`` and turn pages and queries into multivectors.

The three steps of an embedding call are public on their own (``preprocess_*``,
``forward``, ``postprocess``) so the pipelined engine can run them on different
threads; ``embed_images`` / ``embed_queries`` chain them for simple callers.

Only rows where the attention mask is set leave this module: padded rows can be
NaN (SDPA on CPU) or zero (colpali-engine multiplies by the mask) and must never
reach Qdrant or a MaxSim score.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from colstream.embedding.families import QWEN_VL_FAMILIES, family_spec
from colstream.embedding.profile import effective_max_visual_tokens, model_id_for
from colstream.embedding.tiny import is_random_weights_checkpoint
from colstream.infra.settings import ModelSettings

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_LABEL = "(random weights)"

# What the processors hand back that the model must not see: ColPali's processor adds
# `labels` (training only; with them the forward also computes a loss).
_DROPPED_INPUT_KEYS = frozenset({"labels"})


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class ImageGrid:
    """Where a page's image tokens sit among its real tokens: ``rows x cols``, row-major, from ``start``.

    The sink needs it to mean-pool rows and columns of the page (the row/column
    first-stage layout); the positions are those of the real-token array :meth:`EmbeddingModel.postprocess`
    returns, so padding never shifts them.
    """

    start: int
    rows: int
    cols: int


@dataclass
class ModelInputs:
    """A processed batch, still on the host. ``tensors`` go to the device as they are."""

    tensors: dict[str, torch.Tensor]
    size: int

    def slice(self, start: int, stop: int) -> ModelInputs:
        # Every tensor a processor returns is batch-first (ColQwen2 pads pixel_values
        # per image), so halving a batch is slicing dim 0.
        return ModelInputs({k: v[start:stop] for k, v in self.tensors.items()}, stop - start)

    def pin_memory(self) -> ModelInputs:
        return ModelInputs({k: v.pin_memory() for k, v in self.tensors.items()}, self.size)


@dataclass
class EmbeddingModel:
    family: str
    model_name: str
    is_random_weights: bool
    dim: int
    device: torch.device
    dtype: torch.dtype
    model: Any
    processor: Any
    max_visual_tokens: int | None = None
    _thread_local: threading.local = field(default_factory=threading.local, repr=False)

    # -- preprocessing (CPU; safe to call from several threads) -----------------

    def _thread_processor(self) -> Any:
        # Fast tokenizers change their padding state on every padded call and raise
        # "Already borrowed" when two threads share one: each thread gets a copy.
        if threading.current_thread() is threading.main_thread():
            return self.processor
        processor = getattr(self._thread_local, "processor", None)
        if processor is None:
            processor = copy.deepcopy(self.processor)
            self._thread_local.processor = processor
        return processor

    def preprocess_images(self, images: Sequence[Image.Image]) -> ModelInputs:
        batch = self._thread_processor().process_images(list(images))
        return self._to_inputs(batch, len(images))

    def preprocess_queries(self, texts: Sequence[str]) -> ModelInputs:
        batch = self._thread_processor().process_texts(list(texts))
        inputs = self._to_inputs(batch, len(texts))
        if self.family == "colpali" and "token_type_ids" not in inputs.tensors:
            # PaliGemma attends bidirectionally over the prefix marked by token_type_ids==0.
            # Without them, transformers 5 makes a padded query causal but an unpadded one
            # (SDPA, no mask) bidirectional, so a query's vectors depended on its batch.
            # Marking the whole query as prefix is batch-independent and matches how
            # ColPali queries were encoded in training (transformers 4.x treated every
            # label-less prompt as bidirectional prefix).
            inputs.tensors["token_type_ids"] = torch.zeros_like(inputs.tensors["input_ids"])
        return inputs

    def visual_token_estimate(self, width: int, height: int) -> int:
        """Sequence length a page of this size becomes; used to bucket similar pages."""
        if self.family not in QWEN_VL_FAMILIES:
            return int(getattr(self.processor, "image_seq_length", 0) or getattr(self.processor, "image_seq_len", 0))
        grid = self.patch_grid(width, height)
        if grid is None:
            return 0  # extreme aspect ratio: the processor will reject it, bucket anywhere
        merge = self.processor.image_processor.merge_size
        return (grid[0] // merge) * (grid[1] // merge)

    def patch_grid(self, width: int, height: int) -> tuple[int, int] | None:
        """Qwen-VL families: (rows, cols) of vision patches the processor makes of a page this size."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        image_processor = self.processor.image_processor
        patch = image_processor.patch_size
        try:
            h, w = smart_resize(
                height,
                width,
                factor=patch * image_processor.merge_size,
                min_pixels=image_processor.size["shortest_edge"],
                max_pixels=image_processor.size["longest_edge"],
            )
        except ValueError:
            return None
        return h // patch, w // patch

    @staticmethod
    def _to_inputs(batch: Mapping[str, Any], size: int) -> ModelInputs:
        tensors = {k: v for k, v in batch.items() if k not in _DROPPED_INPUT_KEYS and isinstance(v, torch.Tensor)}
        return ModelInputs(tensors, size)

    def image_grids(self, inputs: ModelInputs) -> list[ImageGrid | None]:
        """The image patch grid of each page of a processed batch, None where it cannot be told.

        Image tokens are the positions whose id is the processor's image token. ColQwen2
        reports each image's patch grid before the 2x2 merge (``image_grid_thw``: t, h, w),
        so the visual tokens form (t*h/merge) x (w/merge); ColPali's are a fixed square.
        """
        input_ids = inputs.tensors.get("input_ids")
        attention_mask = inputs.tensors.get("attention_mask")
        image_token_id = getattr(self.processor, "image_token_id", None)
        if self.family == "colgemma3":
            # Gemma3Processor's image_token_id is the begin-of-image marker; the soft image
            # tokens that carry the page are the tokenizer's image token.
            image_token_id = getattr(self.processor.tokenizer, "image_token_id", image_token_id)
        if input_ids is None or attention_mask is None or image_token_id is None:
            return [None] * inputs.size
        grid_thw = inputs.tensors.get("image_grid_thw")
        merge = int(getattr(getattr(self.processor, "image_processor", None), "merge_size", 1) or 1)
        grids: list[ImageGrid | None] = []
        for i in range(inputs.size):
            real_ids = input_ids[i][attention_mask[i].bool()]
            positions = torch.nonzero(real_ids == image_token_id).flatten().tolist()
            if self.family in QWEN_VL_FAMILIES and grid_thw is not None:
                t, h, w = (int(v) for v in grid_thw[i].tolist())
                rows, cols = t * h // merge, w // merge
            else:
                side = math.isqrt(len(positions))
                rows, cols = side, side
            contiguous = bool(positions) and positions[-1] - positions[0] + 1 == len(positions)
            if not contiguous or rows * cols != len(positions):
                grids.append(None)  # unexpected layout: the sink falls back to its own rule
                continue
            grids.append(ImageGrid(start=positions[0], rows=rows, cols=cols))
        return grids

    # -- forward (the device thread) ---------------------------------------------

    def forward(self, inputs: ModelInputs) -> torch.Tensor:
        """Run the model; returns [batch, seq, dim] on the device (padded rows undefined)."""
        non_blocking = self.device.type == "cuda"
        tensors = {k: v.to(self.device, non_blocking=non_blocking) for k, v in inputs.tensors.items()}
        if "pixel_values" in tensors and tensors["pixel_values"].is_floating_point():
            tensors["pixel_values"] = tensors["pixel_values"].to(self.dtype)
        extra: dict[str, Any] = {}
        if self.family == "colpali":
            # The LM head is never used for embeddings: 1 logit instead of seq x 257k
            # (field notes: ~17% fewer FLOPs, identical vectors).
            extra["logits_to_keep"] = 1
        with torch.inference_mode():
            return self.model(**tensors, **extra)

    # -- postprocessing ------------------------------------------------------------

    @staticmethod
    def postprocess(
        outputs: torch.Tensor, attention_mask: torch.Tensor, dtype: np.dtype[Any] | type = np.float32
    ) -> list[np.ndarray]:
        """Keep only the rows where the attention mask is set, as numpy arrays."""
        host = outputs.detach().to("cpu", torch.float32)
        mask = attention_mask.to("cpu").bool()
        return [host[i][mask[i]].numpy().astype(dtype, copy=False) for i in range(host.shape[0])]

    # -- convenience ------------------------------------------------------------

    def embed_images(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        if not images:
            return []
        inputs = self.preprocess_images(images)
        return self.postprocess(self.forward(inputs), inputs.tensors["attention_mask"])

    def embed_queries(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        inputs = self.preprocess_queries(texts)
        return self.postprocess(self.forward(inputs), inputs.tensors["attention_mask"])

    @staticmethod
    def score(query_vecs: np.ndarray, page_vecs: np.ndarray) -> float:
        """ColBERT MaxSim: for each query token its best page token, summed."""
        q = np.asarray(query_vecs, dtype=np.float32)
        p = np.asarray(page_vecs, dtype=np.float32)
        if q.size == 0 or p.size == 0:
            return 0.0
        return float((q @ p.T).max(axis=1).sum())


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device={requested!r} but CUDA is not available on this machine")
    return device


# bf16 needs compute capability 8.0 (Ampere) or newer; older GPUs such as the T4 (7.5),
# the V100 (7.0) and the P100 (6.0) emulate it slowly or not at all, so they get fp16.
BF16_MIN_CAPABILITY = (8, 0)


def resolve_dtype(
    requested: str,
    device: torch.device,
    capability: Callable[[torch.device], tuple[int, int]] | None = None,
) -> torch.dtype:
    """The dtype rule: ``auto`` is bf16 on a GPU that supports it, fp16 on pre-Ampere GPUs
    (compute capability below 8.0, e.g. the T4), fp32 on CPU. An explicit dtype is kept,
    except bf16 asked for on a GPU without it, which is refused."""
    if device.type != "cuda":
        if requested in ("auto", "float32"):
            return torch.float32
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
    major_minor = (capability or _cuda_capability)(device)
    if requested == "auto":
        return torch.bfloat16 if tuple(major_minor) >= BF16_MIN_CAPABILITY else torch.float16
    if requested == "bfloat16" and tuple(major_minor) < BF16_MIN_CAPABILITY:
        raise ModelLoadError(
            f"model.dtype=bfloat16 but the GPU {device} has compute capability "
            f"{major_minor[0]}.{major_minor[1]} (bf16 needs 8.0 or newer): use float16 or auto"
        )
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


def resolve_attn_implementation(settings: ModelSettings, device: torch.device) -> str:
    if settings.attn_implementation:
        return settings.attn_implementation
    # PaliGemma refuses flash attention (it would drop the bidirectional prefix mask).
    if (
        device.type == "cuda"
        and settings.family in QWEN_VL_FAMILIES
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    return "sdpa"


def load_model(settings: ModelSettings) -> EmbeddingModel:
    """Load the configured checkpoint through the normal ``from_pretrained`` path."""
    name_or_path = model_id_for(settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    attn = resolve_attn_implementation(settings, device)
    random_weights = is_random_weights_checkpoint(name_or_path)

    load_kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
    if settings.quantization == "int8":
        if device.type != "cuda":
            raise ModelLoadError("model.quantization=int8 needs a CUDA device (bitsandbytes runs on GPU only)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelLoadError("model.quantization=int8 needs the bitsandbytes package: pip install bitsandbytes")
        from transformers import BitsAndBytesConfig

        load_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        load_kwargs["device_map"] = {"": device.index or 0}

    spec = family_spec(settings.family)
    import colpali_engine.models as engine_models

    model_class = getattr(engine_models, spec.model_class)
    processor_class = getattr(engine_models, spec.processor_class)
    max_visual_tokens: int | None = None
    processor_kwargs: dict[str, Any] = {}
    if spec.takes_max_visual_tokens:
        max_visual_tokens = effective_max_visual_tokens(settings)
        processor_kwargs["max_num_visual_tokens"] = max_visual_tokens
    try:
        model = model_class.from_pretrained(name_or_path, **load_kwargs)
        processor = processor_class.from_pretrained(name_or_path, **processor_kwargs)
    except OSError as exc:
        raise ModelLoadError(
            f"could not load {settings.family} checkpoint {name_or_path!r}: {exc}. "
            "The Hugging Face hub may be unreachable: point model.name_or_path at a local folder "
            "(a tiny random-weights one can be built with colstream.embedding.tiny)."
        ) from exc
    if spec.takes_max_visual_tokens:
        # colpali-engine also sets the deprecated `max_pixels` attribute, which makes
        # every call warn; `size["longest_edge"]` already carries the same cap.
        processor.image_processor.__dict__.pop("max_pixels", None)

    if settings.family == "colpali":
        _retie_colpali_lm_head(model)
    if "quantization_config" not in load_kwargs:
        model = model.to(device)
    model.eval()

    label = name_or_path + (f" {RANDOM_WEIGHTS_LABEL}" if random_weights else "")
    if random_weights:
        log.warning("loaded %s: vectors from random weights carry no meaning", label)
    return EmbeddingModel(
        family=settings.family,
        model_name=label,
        is_random_weights=random_weights,
        dim=projection_dim(model),
        device=device,
        dtype=dtype,
        model=model,
        processor=processor,
        max_visual_tokens=max_visual_tokens,
    )


def projection_dim(model: Any) -> int:
    """The multivector width, read from the loaded projection layer (``custom_text_proj``, or
    ``linear`` in ColIdefics3), not from the class's default ``dim``."""
    for name in ("custom_text_proj", "linear"):
        layer = getattr(model, name, None)
        out_features = getattr(layer, "out_features", None)
        if isinstance(out_features, int) and out_features > 0:
            return out_features
    return int(model.dim)


def _retie_colpali_lm_head(model: Any) -> None:
    # PaliGemma ties lm_head to the token embeddings, so checkpoints omit it; with
    # colpali-engine's key mapping, transformers 5 then leaves it on the meta device
    # and `.to(device)` fails. Embeddings never use its values (logits_to_keep=1),
    # but the module must be real: tie it back to the input embeddings.
    lm_head = getattr(getattr(model, "model", None), "lm_head", None)
    if lm_head is not None and lm_head.weight.is_meta:
        lm_head.weight = model.get_input_embeddings().weight
