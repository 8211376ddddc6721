"""The ColPali-style model families colstream serves, one entry per colpali-engine class pair.

Each family names its colpali-engine model and processor classes (pages go through
``process_images``, queries through ``process_texts``), its default checkpoint on the
Hugging Face hub, the other checkpoints known to load with it, and how its page token
count is capped. The multivector dimension is never taken from here to build an index:
it is read from the checkpoint (``profile.index_model_for``, the projection's shape in
the safetensors headers) or from the loaded model. ``published_dim`` is only what
``colstream models list`` shows when no copy of the checkpoint is at hand.

Imports nothing heavy: the CLI and the splitter read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# How a family bounds the number of tokens a page becomes.
#   visual_tokens: dynamic resolution; model.max_visual_tokens caps the merged visual tokens
#   fixed_square:  every page is resized to one square, a fixed number of image tokens
#   tiles:         the page is split into tiles of a fixed size (plus a global view), each a
#                  fixed number of tokens; the image processor's longest edge bounds the tiles
TokenCap = Literal["visual_tokens", "fixed_square", "tiles"]


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_class: str  # in colpali_engine.models
    processor_class: str  # in colpali_engine.models
    default_model_id: str
    published_dim: int
    token_cap: TokenCap
    token_cap_note: str
    # Other hub checkpoints that load with the same classes (model id -> note).
    checkpoints: tuple[tuple[str, str], ...] = ()
    # Processors that take colpali-engine's ``max_num_visual_tokens`` (Qwen-VL families).
    takes_max_visual_tokens: bool = False
    # Qwen-VL layout: image_grid_thw, spatial merge, pixel_values padded per image.
    qwen_vl: bool = False
    note: str = ""


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="colqwen2",
            model_class="ColQwen2",
            processor_class="ColQwen2Processor",
            default_model_id="vidore/colqwen2-v1.0",
            published_dim=128,
            token_cap="visual_tokens",
            token_cap_note="model.max_visual_tokens (768, the training setting; 28x28 px per token)",
            checkpoints=(("vidore/colqwen2-v0.1", "earlier training run"),),
            takes_max_visual_tokens=True,
            qwen_vl=True,
        ),
        FamilySpec(
            name="colqwen2_5",
            model_class="ColQwen2_5",
            processor_class="ColQwen2_5_Processor",
            default_model_id="vidore/colqwen2.5-v0.2",
            published_dim=128,
            token_cap="visual_tokens",
            token_cap_note="model.max_visual_tokens (768; 28x28 px per token)",
            checkpoints=(("vidore/colqwen2.5-v0.1", "earlier training run"),),
            takes_max_visual_tokens=True,
            qwen_vl=True,
        ),
        FamilySpec(
            name="colqwen3",
            model_class="ColQwen3",
            processor_class="ColQwen3Processor",
            default_model_id="TomoroAI/tomoro-colqwen3-embed-4b",
            published_dim=320,
            token_cap="visual_tokens",
            token_cap_note="model.max_visual_tokens (32x32 px per token: patch 16, merge 2)",
            checkpoints=(("TomoroAI/tomoro-colqwen3-embed-8b", "larger backbone, same 320 dimensions"),),
            takes_max_visual_tokens=True,
            qwen_vl=True,
        ),
        FamilySpec(
            name="colqwen3_5",
            model_class="ColQwen3_5",
            processor_class="ColQwen3_5Processor",
            default_model_id="athrael-soju/colqwen3.5-4.5B-v3",
            published_dim=128,
            token_cap="visual_tokens",
            token_cap_note="model.max_visual_tokens (32x32 px per token: patch 16, merge 2)",
            takes_max_visual_tokens=True,
            qwen_vl=True,
            note="hybrid GatedDeltaNet backbone: install causal-conv1d and flash-linear-attention on GPUs",
        ),
        FamilySpec(
            name="colpali",
            model_class="ColPali",
            processor_class="ColPaliProcessor",
            default_model_id="vidore/colpali-v1.2",
            published_dim=128,
            token_cap="fixed_square",
            token_cap_note="fixed: 448x448 px, 1024 image tokens plus the prompt",
            checkpoints=(
                ("vidore/colpali-v1.3", "same architecture, longer training (ViDoRe 84.8 vs 83.9)"),
                ("vidore/colpali-v1.1", "right-padding fix of the original"),
            ),
        ),
        FamilySpec(
            name="colidefics3",
            model_class="ColIdefics3",
            processor_class="ColIdefics3Processor",
            default_model_id="vidore/colSmol-256M",
            published_dim=128,
            token_cap="tiles",
            token_cap_note="tiles: the image processor's longest edge / its tile size, 64 tokens per tile",
            checkpoints=(("vidore/colSmol-500M", "larger SmolVLM backbone"),),
            note="ColSmol: small enough for CPU serving",
        ),
        FamilySpec(
            name="colmodernvbert",
            model_class="ColModernVBert",
            processor_class="ColModernVBertProcessor",
            default_model_id="ModernVBERT/colmodernvbert",
            published_dim=128,
            token_cap="tiles",
            token_cap_note="tiles: the image processor's longest edge / its tile size, 64 tokens per tile",
            note="bidirectional ModernBERT encoder, 250M parameters",
        ),
        FamilySpec(
            name="colgemma3",
            model_class="ColGemma3",
            processor_class="ColGemmaProcessor3",
            default_model_id="Cognitive-Lab/ColNetraEmbed",
            published_dim=128,
            token_cap="fixed_square",
            token_cap_note="fixed: 896x896 px, 256 image tokens (mm_tokens_per_image) plus the prompt",
            note="Gemma 3 backbone; the processor formats pages and queries with the chat template",
        ),
    )
}

FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)
QWEN_VL_FAMILIES: frozenset[str] = frozenset(name for name, spec in FAMILIES.items() if spec.qwen_vl)


def family_spec(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(FAMILY_NAMES)}") from None
