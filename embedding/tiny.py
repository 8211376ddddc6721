"""Tiny, randomly initialised ColQwen2 / ColPali checkpoints built fully offline.

The Hugging Face hub is unreachable from where this project is built and tested,
so tests and demos need checkpoints that exercise exactly the production path:
config + weights + processor + tokenizer written with ``save_pretrained`` and read
back by ``ColQwen2.from_pretrained(dir)`` / ``ColQwen2Processor.from_pretrained(dir)``.

The weights are random: vectors from these checkpoints carry no meaning. Every
checkpoint says so twice: a ``RANDOM_WEIGHTS.md`` for people and
``colstream_checkpoint.json`` (``colstream_random_weights: true``) for the loader,
which then labels the model "(random weights)" everywhere it is shown.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

Family = Literal["colqwen2", "colpali"]

MARKER_FILE = "colstream_checkpoint.json"
RANDOM_WEIGHTS_KEY = "colstream_random_weights"
README_FILE = "RANDOM_WEIGHTS.md"
SEED = 1234
# Bump when the recipe changes so cached checkpoints are rebuilt.
RECIPE_VERSION = 1

# A small visual-token cap keeps CPU inference in milliseconds; 28 = patch 14 x merge 2.
TINY_COLQWEN2_MAX_VISUAL_TOKENS = 64
TINY_COLPALI_IMAGE_SIZE = 224
_PATCH = 14

QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
GEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
# PaliGemma's processor appends these to every tokenizer; adding them up front keeps
# the saved vocabulary (and so the embedding matrix) stable across reloads.
PALIGEMMA_EXTRA_TOKENS = [f"<loc{i:0>4}>" for i in range(1024)] + [f"<seg{i:0>3}>" for i in range(128)]

_CORPUS = [
    "invoice total amount due payment terms net thirty days",
    "the quarterly report shows revenue growth in every region",
    "contract between the parties signed on the date written below",
    "table of contents introduction methods results discussion appendix",
    "what is the total on the invoice? which page shows the chart?",
    "Describe the image. user assistant system page figure caption",
    "0123456789 ., ;:!?()[]{}-_/\\'\"@#%&*+=<>|~`$^",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz",
]


def is_random_weights_checkpoint(path: str | Path) -> bool:
    marker = Path(path) / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()).get(RANDOM_WEIGHTS_KEY, False))
    except (OSError, ValueError):
        return False


def build_tiny_checkpoint(family: Family, out_dir: Path) -> Path:
    """Build a tiny random-weights checkpoint for ``family`` into ``out_dir``.

    Deterministic: the same recipe version gives the same weights and vocabulary.
    Returns ``out_dir``.
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Seed everything the constructors touch; restore the global RNG afterwards so
    # building a checkpoint never changes what a caller's random numbers are.
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        if family == "colqwen2":
            details = _build_colqwen2(out_dir)
        elif family == "colpali":
            details = _build_colpali(out_dir)
        else:
            raise ValueError(f"unknown model family {family!r}; expected 'colqwen2' or 'colpali'")
    finally:
        torch.random.set_rng_state(rng_state)
    _write_markers(out_dir, family, details)
    return out_dir


def ensure_tiny_checkpoint(family: Family, cache_dir: Path) -> Path:
    """Return a cached tiny checkpoint, building it once (atomically) if missing."""
    target = Path(cache_dir) / f"tiny-{family}-v{RECIPE_VERSION}"
    if is_random_weights_checkpoint(target) and (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a concurrent or interrupted build never
    # leaves a half-written folder that looks complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny_checkpoint(family, staging)
        try:
            os.replace(staging, target)
        except OSError:
            # Someone else won the race (target exists and is not empty): use theirs.
            if not is_random_weights_checkpoint(target):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_markers(out_dir: Path, family: Family, details: dict[str, Any]) -> None:
    marker = {RANDOM_WEIGHTS_KEY: True, "family": family, "recipe_version": RECIPE_VERSION, "seed": SEED}
    marker.update(details)
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    (out_dir / README_FILE).write_text(
        f"# Random weights: not a trained model\n\n"
        f"This is a tiny `{family}` checkpoint built by `colstream.embedding.tiny` with randomly\n"
        f"initialised weights (seed {SEED}). It has the real architecture and loads through\n"
        f"`from_pretrained`, so the pipeline can run end to end without the Hugging Face hub,\n"
        f"but its vectors carry no meaning: search results from it are noise.\n\n"
        f"Details: `{MARKER_FILE}`.\n"
    )


def _train_byte_level_tokenizer(special_tokens: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer


def build_colqwen2_processor(max_visual_tokens: int = TINY_COLQWEN2_MAX_VISUAL_TOKENS) -> Any:
    """A ColQwen2 processor with a tiny trained tokenizer and the real image pipeline
    (Qwen2-VL patching, CLIP normalisation), capped at ``max_visual_tokens``."""
    from colpali_engine.models import ColQwen2Processor
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    raw = _train_byte_level_tokenizer(QWEN2_VL_SPECIAL_TOKENS, vocab_size=512)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2_VL_SPECIAL_TOKENS})
    merge_pixels = (_PATCH * 2) ** 2
    image_processor = Qwen2VLImageProcessor(
        min_pixels=4 * merge_pixels,
        max_pixels=max_visual_tokens * merge_pixels,
        patch_size=_PATCH,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    # The processor refuses to exist without a video processor even for images only.
    video_processor = Qwen2VLVideoProcessor()
    return ColQwen2Processor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)


def qwen2_vl_token_ids(processor: Any) -> dict[str, Any]:
    """The config fields that must agree with the tokenizer's special-token ids."""
    token_id = processor.tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": token_id("<|image_pad|>"),
        "video_token_id": token_id("<|video_pad|>"),
        "vision_start_token_id": token_id("<|vision_start|>"),
        "vision_end_token_id": token_id("<|vision_end|>"),
    }


def mrope_section(head_dim: int) -> list[int]:
    # Qwen2-VL-2B uses [16, 24, 24] for head_dim 128: a 2:3:3 split summing to head_dim/2.
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def _build_colqwen2(out_dir: Path) -> dict[str, Any]:
    from colpali_engine.models import ColQwen2
    from transformers.models.qwen2_vl import Qwen2VLConfig

    processor = build_colqwen2_processor()
    tokenizer = processor.tokenizer
    token_id = tokenizer.convert_tokens_to_ids

    head_dim = 64 // 4
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            # mrope splits head_dim/2 rotary frequencies over (time, height, width).
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": mrope_section(head_dim),
            },
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": token_id("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "mlp_ratio": 2,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": _PATCH,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **qwen2_vl_token_ids(processor),
        tie_word_embeddings=False,
    )
    model = ColQwen2(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {"max_visual_tokens": TINY_COLQWEN2_MAX_VISUAL_TOKENS, "vocab_size": len(tokenizer)}


def build_colpali_processor(image_size: int = TINY_COLPALI_IMAGE_SIZE) -> Any:
    """A ColPali processor with a tiny byte-level Gemma-style tokenizer (plus PaliGemma's
    ``<image>``, ``<locNNNN>`` and ``<segNNN>`` tokens) and the SigLIP image pipeline."""
    from colpali_engine.models import ColPaliProcessor
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.models.siglip.image_processing_siglip import SiglipImageProcessor

    raw = _train_byte_level_tokenizer(GEMMA_SPECIAL_TOKENS, vocab_size=512)
    raw.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    raw.add_tokens([AddedToken(t, normalized=False) for t in PALIGEMMA_EXTRA_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        model_max_length=8192,
        padding_side="right",
    )
    image_processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=3,
    )
    # PaliGemmaProcessor reads the number of <image> tokens from the image processor.
    setattr(image_processor, "image_seq_length", (image_size // _PATCH) ** 2)  # noqa: B010
    return ColPaliProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _build_colpali(out_dir: Path) -> dict[str, Any]:
    from colpali_engine.models import ColPali
    from transformers import PaliGemmaConfig

    processor = build_colpali_processor()
    tokenizer = processor.tokenizer
    image_seq_length = processor.image_seq_length
    vocab_size = len(processor.tokenizer)
    config = PaliGemmaConfig(
        text_config={
            "model_type": "gemma",
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 4096,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": _PATCH,
            "image_size": TINY_COLPALI_IMAGE_SIZE,
            "projection_dim": 64,
        },
        image_token_index=processor.image_token_id,
        vocab_size=vocab_size,
        projection_dim=64,
        hidden_size=64,
    )
    text_config: Any = config.text_config
    text_config.num_image_tokens = image_seq_length
    model = ColPali(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {"image_size": TINY_COLPALI_IMAGE_SIZE, "vocab_size": vocab_size}
