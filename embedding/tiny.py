"""Tiny, randomly initialised checkpoints of every model family, built fully offline.

The Hugging Face hub is unreachable from where this project is built and tested,
so tests and demos need checkpoints that exercise exactly the production path:
config + weights + processor + tokenizer written with ``save_pretrained`` and read
back by ``ColQwen2.from_pretrained(dir)`` / ``ColQwen2Processor.from_pretrained(dir)`` (and
the same pair of every other family in ``colstream.embedding.families``).

The weights are random: vectors from these checkpoints carry no meaning. Every
checkpoint says so twice: a ``RANDOM_WEIGHTS.md`` for people and
``colstream_checkpoint.json`` (``colstream_random_weights: true``) for the loader,
which then labels the model "(random weights)" everywhere it is shown.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

Family = Literal[
    "colqwen2", "colqwen2_5", "colqwen3", "colqwen3_5", "colpali", "colidefics3", "colmodernvbert", "colgemma3"
]

MARKER_FILE = "colstream_checkpoint.json"
RANDOM_WEIGHTS_KEY = "colstream_random_weights"
README_FILE = "RANDOM_WEIGHTS.md"
SEED = 1234
# Bump when the recipe changes so cached checkpoints are rebuilt (the cache folder is
# also named by a digest of the family's recipe below, so changing a size rebuilds too).
RECIPE_VERSION = 1

# The sizes each family's tiny checkpoint is built with. Every builder reads its numbers
# from here, so the cache key (family + digest of this entry) changes whenever they do.
_TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
_TINY_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2}
RECIPES: dict[str, dict[str, Any]] = {
    "colqwen2": {"patch": 14, "max_visual_tokens": 64},
    "colqwen2_5": {"patch": 14, "max_visual_tokens": 64, "text": _TINY_TEXT, "vision": _TINY_VISION},
    "colqwen3": {"patch": 16, "max_visual_tokens": 64, "text": _TINY_TEXT, "vision": _TINY_VISION},
    "colqwen3_5": {"patch": 16, "max_visual_tokens": 64, "text": _TINY_TEXT, "vision": _TINY_VISION},
    "colpali": {"patch": 14, "image_size": 224},
    "colidefics3": {"patch": 16, "tile": 64, "scale": 2, "longest_edge": 128, "text": _TINY_TEXT},
    "colmodernvbert": {"patch": 16, "tile": 64, "scale": 2, "longest_edge": 128, "text": _TINY_TEXT},
    "colgemma3": {"patch": 16, "image_size": 64, "tokens_per_image": 4, "text": _TINY_TEXT},
}

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


def build_tiny_checkpoint(family: Family | str, out_dir: Path) -> Path:
    """Build a tiny random-weights checkpoint for ``family`` into ``out_dir``.

    Deterministic: the same recipe gives the same weights and vocabulary.
    Returns ``out_dir``.
    """
    import torch

    builder = _BUILDERS.get(family)
    if builder is None:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(_BUILDERS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Seed everything the constructors touch; restore the global RNG afterwards so
    # building a checkpoint never changes what a caller's random numbers are.
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        details = builder(out_dir)
    finally:
        torch.random.set_rng_state(rng_state)
    _write_markers(out_dir, family, details)
    return out_dir


def recipe_digest(family: str) -> str:
    """Digest of what defines a family's tiny checkpoint: the recipe version and sizes."""
    recipe = {"family": family, "recipe_version": RECIPE_VERSION, "seed": SEED, "recipe": RECIPES[family]}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def tiny_checkpoint_dir(family: Family | str, cache_dir: Path) -> Path:
    """Where the cache keeps ``family``'s tiny checkpoint: named by family and recipe digest."""
    if family not in RECIPES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(RECIPES)}")
    return Path(cache_dir) / f"tiny-{family}-{recipe_digest(family)}"


def ensure_tiny_checkpoint(family: Family | str, cache_dir: Path) -> Path:
    """Return a cached tiny checkpoint, building it once (atomically) if missing."""
    target = tiny_checkpoint_dir(family, cache_dir)
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


def _write_markers(out_dir: Path, family: str, details: dict[str, Any]) -> None:
    marker = {
        RANDOM_WEIGHTS_KEY: True,
        "family": family,
        "recipe_version": RECIPE_VERSION,
        "recipe_digest": recipe_digest(family),
        "seed": SEED,
    }
    marker.update(details)
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    (out_dir / README_FILE).write_text(
        f"# RANDOM WEIGHTS: not a trained model\n\n"
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


def build_colqwen2_processor(
    max_visual_tokens: int = TINY_COLQWEN2_MAX_VISUAL_TOKENS, family: str = "colqwen2", patch: int = _PATCH
) -> Any:
    """A Qwen-VL family processor (ColQwen2 by default) with a tiny trained tokenizer and the
    real image pipeline (Qwen-VL patching, CLIP normalisation), capped at ``max_visual_tokens``."""
    import colpali_engine.models as engine_models
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from colstream.embedding.families import family_spec

    processor_class = getattr(engine_models, family_spec(family).processor_class)

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
    merge_pixels = (patch * 2) ** 2
    image_processor = Qwen2VLImageProcessor(
        min_pixels=4 * merge_pixels,
        max_pixels=max_visual_tokens * merge_pixels,
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    # The processor refuses to exist without a video processor even for images only.
    video_processor: Any
    if family in ("colqwen3", "colqwen3_5"):
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        video_processor = Qwen3VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
    elif family == "colqwen2":
        video_processor = Qwen2VLVideoProcessor()
    else:
        video_processor = Qwen2VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)


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


def _single_id(tokenizer: Any, token: str) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int):
        raise ValueError(f"token {token!r} is not one id in the tiny tokenizer: {found!r}")
    return found


def _qwen_text_config(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    token_id = tokenizer.convert_tokens_to_ids
    return {
        "vocab_size": len(tokenizer),
        **_TINY_TEXT,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "bos_token_id": token_id("<|endoftext|>"),
        "eos_token_id": token_id("<|im_end|>"),
        "pad_token_id": token_id("<|endoftext|>"),
        **extra,
    }


def _build_qwen_vl(out_dir: Path, family: str) -> dict[str, Any]:
    """ColQwen2.5, ColQwen3 and ColQwen3.5: the Qwen-VL processor path with their own backbones."""
    import colpali_engine.models as engine_models

    from colstream.embedding.families import family_spec

    recipe = RECIPES[family]
    patch, cap = recipe["patch"], recipe["max_visual_tokens"]
    processor = build_colqwen2_processor(cap, family=family, patch=patch)
    tokenizer = processor.tokenizer
    head_dim = _TINY_TEXT["hidden_size"] // _TINY_TEXT["num_attention_heads"]
    vision = {
        **_TINY_VISION,
        "out_hidden_size": _TINY_TEXT["hidden_size"],
        "patch_size": patch,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config: Any
    if family == "colqwen2_5":
        from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig

        text = _qwen_text_config(
            tokenizer,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": mrope_section(head_dim),
            },
        )
        # Window attention over 2x2 merged tokens; the last block attends globally.
        vision.update(window_size=patch * 4, fullatt_block_indexes=[_TINY_VISION["depth"] - 1])
        config = Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, **qwen2_vl_token_ids(processor), tie_word_embeddings=False
        )
    elif family == "colqwen3":
        from transformers.models.qwen3_vl import Qwen3VLConfig

        # Interleaved mrope over head_dim/2 = 8 frequencies (time, height, width).
        text = _qwen_text_config(
            tokenizer,
            head_dim=head_dim,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 500_000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        )
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
        config = Qwen3VLConfig(
            text_config=text, vision_config=vision, **qwen2_vl_token_ids(processor), tie_word_embeddings=False
        )
    else:
        from transformers.models.qwen3_5 import Qwen3_5Config

        # One GatedDeltaNet (linear attention) layer and one full-attention layer, as in
        # the real hybrid stack; partial rotary 0.25 of head_dim 16 leaves 2 frequencies.
        text = _qwen_text_config(
            tokenizer,
            head_dim=head_dim,
            layer_types=["linear_attention", "full_attention"],
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10_000.0,
                "partial_rotary_factor": 0.25,
                "mrope_section": [1, 1, 0],
                "mrope_interleaved": True,
            },
        )
        vision.update(num_position_embeddings=64)
        config = Qwen3_5Config(
            text_config=text, vision_config=vision, **qwen2_vl_token_ids(processor), tie_word_embeddings=False
        )
    model_class = getattr(engine_models, family_spec(family).model_class)
    model = model_class(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {"max_visual_tokens": cap, "vocab_size": len(tokenizer)}


IDEFICS3_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|begin_of_text|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<global-img>",
    "<image>",
    "<pad>",
]
# Idefics3's processor names each tile by its row and column.
IDEFICS3_TILE_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]


def _build_idefics3_like(out_dir: Path, family: str) -> dict[str, Any]:
    """ColIdefics3 (ColSmol) and ColModernVBert: Idefics3 tiling processor, SigLIP tiles."""
    from colpali_engine.models import ColIdefics3, ColIdefics3Processor, ColModernVBert, ColModernVBertProcessor
    from tokenizers import AddedToken
    from transformers import Idefics3Config, ModernVBertConfig, PreTrainedTokenizerFast
    from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessor

    recipe = RECIPES[family]
    tile, patch, scale = recipe["tile"], recipe["patch"], recipe["scale"]
    raw = _train_byte_level_tokenizer(IDEFICS3_SPECIAL_TOKENS, vocab_size=512)
    raw.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in IDEFICS3_TILE_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="<pad>",
        eos_token="<end_of_utterance>",
        bos_token="<|begin_of_text|>" if family == "colmodernvbert" else "<|im_start|>",
        unk_token=None,
        model_max_length=8192,
        padding_side="left",
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]}
    )
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": recipe["longest_edge"]},
        max_image_size={"longest_edge": tile},
        do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    # Tokens per tile: (tile / patch)^2 patches, pixel-shuffled by scale^2.
    image_seq_len = (tile // patch) ** 2 // scale**2
    processor_class = ColIdefics3Processor if family == "colidefics3" else ColModernVBertProcessor
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len)
    vocab_size = len(tokenizer)
    text = {
        "vocab_size": vocab_size,
        **recipe["text"],
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": tile,
        "patch_size": patch,
    }
    image_token_id = _single_id(tokenizer, "<image>")
    model: Any
    if family == "colidefics3":
        config: Any = Idefics3Config(
            text_config={"model_type": "llama", **text, "num_key_value_heads": 2},
            vision_config=vision,
            image_token_id=image_token_id,
            scale_factor=scale,
            tie_word_embeddings=False,
        )
        model = ColIdefics3(config).eval()
    else:
        config = ModernVBertConfig(
            text_config={
                **text,
                "intermediate_size": 96,
                "cls_token_id": tokenizer.bos_token_id,
                "sep_token_id": tokenizer.eos_token_id,
                "layer_types": ["full_attention", "sliding_attention"],
                "local_attention": 16,
            },
            vision_config={"model_type": "siglip_vision_model", **vision},
            image_token_id=image_token_id,
            pixel_shuffle_factor=scale,
        )
        model = ColModernVBert(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {"tile": tile, "longest_edge": recipe["longest_edge"], "vocab_size": vocab_size}


GEMMA3_SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
# Gemma 3's chat template, reduced to what ColGemmaProcessor3 formats: turns with text and images.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _build_colgemma3(out_dir: Path) -> dict[str, Any]:
    from colpali_engine.models import ColGemma3, ColGemmaProcessor3
    from transformers import Gemma3Config, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_gemma3 import Gemma3ImageProcessor

    recipe = RECIPES["colgemma3"]
    image_size, patch, tokens = recipe["image_size"], recipe["patch"], recipe["tokens_per_image"]
    raw = _train_byte_level_tokenizer(GEMMA3_SPECIAL_TOKENS, vocab_size=512)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        model_max_length=8192,
        padding_side="left",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    image_processor = Gemma3ImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    processor = ColGemmaProcessor3(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=tokens,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )

    def token_id(token: str) -> int:
        return _single_id(tokenizer, token)

    vocab_size = len(tokenizer)
    config = Gemma3Config(
        text_config={
            "vocab_size": vocab_size,
            **recipe["text"],
            "num_key_value_heads": 1,
            "head_dim": 16,
            "sliding_window": 32,
            "layer_types": ["sliding_attention", "full_attention"],
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
            "image_size": image_size,
            "patch_size": patch,
        },
        mm_tokens_per_image=tokens,
        boi_token_index=token_id("<start_of_image>"),
        eoi_token_index=token_id("<end_of_image>"),
        image_token_index=token_id("<image_soft_token>"),
        tie_word_embeddings=False,
    )
    model = ColGemma3(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {"image_size": image_size, "vocab_size": vocab_size}


_BUILDERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "colqwen2": _build_colqwen2,
    "colqwen2_5": lambda out: _build_qwen_vl(out, "colqwen2_5"),
    "colqwen3": lambda out: _build_qwen_vl(out, "colqwen3"),
    "colqwen3_5": lambda out: _build_qwen_vl(out, "colqwen3_5"),
    "colpali": _build_colpali,
    "colidefics3": lambda out: _build_idefics3_like(out, "colidefics3"),
    "colmodernvbert": lambda out: _build_idefics3_like(out, "colmodernvbert"),
    "colgemma3": _build_colgemma3,
}
