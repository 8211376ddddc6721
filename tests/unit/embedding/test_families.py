"""Every model family: registry, dtype rule, tiny random-weights checkpoints through
``from_pretrained``, dimension read from the checkpoint and the loaded model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from colstream.embedding.families import FAMILIES, FAMILY_NAMES, family_spec
from colstream.embedding.model import (
    BF16_MIN_CAPABILITY,
    EmbeddingModel,
    ModelLoadError,
    load_model,
    resolve_dtype,
)
from colstream.embedding.profile import DEFAULT_MODEL_IDS, index_model_for, render_target_for
from colstream.embedding.tiny import (
    MARKER_FILE,
    README_FILE,
    RECIPES,
    ensure_tiny_checkpoint,
    recipe_digest,
    tiny_checkpoint_dir,
)
from colstream.infra.settings import ModelSettings

REPO = Path(__file__).resolve().parents[3]
MODEL_CACHE = REPO / ".colstream" / "models"
# Loading a model imports transformers and colpali-engine, several seconds by itself: tests
# that load one (or pool tokens with colpali-engine) run in the full suite, not in the quick tier.
loads_a_model = pytest.mark.slow

EXPECTED_DEFAULTS = {
    "colqwen2": "vidore/colqwen2-v1.0",
    "colqwen2_5": "vidore/colqwen2.5-v0.2",
    "colqwen3": "TomoroAI/tomoro-colqwen3-embed-4b",
    "colqwen3_5": "athrael-soju/colqwen3.5-4.5B-v3",
    "colpali": "vidore/colpali-v1.2",
    "colidefics3": "vidore/colSmol-256M",
    "colmodernvbert": "ModernVBERT/colmodernvbert",
    "colgemma3": "Cognitive-Lab/ColNetraEmbed",
}


# -- registry ---------------------------------------------------------------------------


@loads_a_model
def test_every_colpali_engine_family_is_registered_with_real_classes() -> None:
    import colpali_engine.models as engine_models

    assert set(FAMILY_NAMES) == set(EXPECTED_DEFAULTS)
    for name, spec in FAMILIES.items():
        assert spec.default_model_id == EXPECTED_DEFAULTS[name] == DEFAULT_MODEL_IDS[name]
        model_class = getattr(engine_models, spec.model_class)
        processor_class = getattr(engine_models, spec.processor_class)
        # Pages and queries take these two processor paths.
        assert callable(processor_class.process_images) and callable(processor_class.process_texts)
        assert callable(model_class.from_pretrained)
    assert "vidore/colpali-v1.3" in dict(FAMILIES["colpali"].checkpoints)


def test_settings_accept_every_family_and_refuse_others() -> None:
    for name in FAMILY_NAMES:
        assert ModelSettings(family=name).family == name  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ModelSettings(family="colbert")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown model family"):
        family_spec("colbert")


# -- dtype rule -------------------------------------------------------------------------


def _gpu(capability: tuple[int, int]) -> Callable[[torch.device], tuple[int, int]]:
    return lambda device: capability


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((7, 5), torch.float16),  # T4
        ((7, 0), torch.float16),  # V100
        ((6, 0), torch.float16),  # P100
        ((8, 0), torch.bfloat16),  # A100
        ((8, 6), torch.bfloat16),  # A10 / RTX 30
        ((8, 9), torch.bfloat16),  # L4
        ((9, 0), torch.bfloat16),  # H100 / H200
    ],
)
def test_auto_dtype_is_bf16_from_ampere_and_fp16_before(capability: tuple[int, int], expected: torch.dtype) -> None:
    assert resolve_dtype("auto", torch.device("cuda:0"), _gpu(capability)) == expected


def test_auto_dtype_on_cpu_is_fp32_and_never_asks_for_a_capability() -> None:
    def no_gpu(device: torch.device) -> tuple[int, int]:
        raise AssertionError("asked a CPU for its compute capability")

    assert resolve_dtype("auto", torch.device("cpu"), no_gpu) == torch.float32
    assert resolve_dtype("float32", torch.device("cpu"), no_gpu) == torch.float32


def test_explicit_dtypes_are_kept_but_bf16_on_a_t4_is_refused() -> None:
    t4 = _gpu((7, 5))
    assert resolve_dtype("float16", torch.device("cuda:0"), t4) == torch.float16
    assert resolve_dtype("float32", torch.device("cuda:0"), t4) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cuda:0"), _gpu(BF16_MIN_CAPABILITY)) == torch.bfloat16
    with pytest.raises(ModelLoadError, match=r"compute capability 7\.5"):
        resolve_dtype("bfloat16", torch.device("cuda:0"), t4)


def test_dtype_rule_asks_the_device_it_is_given() -> None:
    asked: list[torch.device] = []

    def capability(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return (8, 0) if device.index == 1 else (7, 5)

    assert resolve_dtype("auto", torch.device("cuda:0"), capability) == torch.float16
    assert resolve_dtype("auto", torch.device("cuda:1"), capability) == torch.bfloat16
    assert asked == [torch.device("cuda:0"), torch.device("cuda:1")]


# -- tiny checkpoints -------------------------------------------------------------------


def test_tiny_cache_is_keyed_by_family_and_recipe_digest(tmp_path: Path) -> None:
    digests = {family: recipe_digest(family) for family in RECIPES}
    assert len(set(digests.values())) == len(RECIPES)
    for family, digest in digests.items():
        assert tiny_checkpoint_dir(family, tmp_path) == tmp_path / f"tiny-{family}-{digest}"
    with pytest.raises(ValueError, match="unknown model family"):
        tiny_checkpoint_dir("colbert", tmp_path)


def _page(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (595, 842), "white")
    draw = ImageDraw.Draw(image)
    for line in range(10, 820, 18):
        draw.text((10, line), " ".join(f"w{rng.integers(0, 999)}" for _ in range(6)), fill="black")
    return image


@pytest.fixture(scope="module", params=[pytest.param(f, marks=loads_a_model) for f in FAMILY_NAMES])
def family_model(request: pytest.FixtureRequest) -> tuple[str, Path, EmbeddingModel]:
    family = request.param
    path = ensure_tiny_checkpoint(family, MODEL_CACHE)
    return family, path, load_model(ModelSettings(family=family, name_or_path=str(path), device="cpu"))


def test_tiny_checkpoint_loads_through_from_pretrained_labelled_random_weights(
    family_model: tuple[str, Path, EmbeddingModel],
) -> None:
    family, path, model = family_model
    assert path.name == f"tiny-{family}-{recipe_digest(family)}"
    marker = json.loads((path / MARKER_FILE).read_text())
    assert marker["colstream_random_weights"] is True and marker["family"] == family
    assert "RANDOM WEIGHTS" in (path / README_FILE).read_text()
    assert model.is_random_weights and model.model_name.endswith("(random weights)")
    assert model.family == family and model.dtype == torch.float32
    # The class the family names, not a fallback.
    assert type(model.model).__name__ == family_spec(family).model_class
    assert type(model.processor).__name__ == family_spec(family).processor_class


def test_dimension_is_read_from_the_checkpoint_and_the_model(family_model: tuple[str, Path, EmbeddingModel]) -> None:
    family, path, model = family_model
    settings = ModelSettings(family=family, name_or_path=str(path), device="cpu")  # type: ignore[arg-type]
    index = index_model_for(settings)
    assert index.dim == model.dim
    assert index.family == family and index.random_weights
    assert model.dim == (320 if family == "colqwen3" else 128)


def test_pages_and_queries_embed_finite_unit_vectors(family_model: tuple[str, Path, EmbeddingModel]) -> None:
    _, _, model = family_model
    pages = model.embed_images([_page(1), _page(2)])
    queries = model.embed_queries(["what is the total on the invoice", "chart"])
    for vectors in (*pages, *queries):
        assert vectors.ndim == 2 and vectors.shape[1] == model.dim and vectors.shape[0] > 0
        assert np.isfinite(vectors).all()
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    # A page's vectors do not depend on its batch (only real rows leave the model).
    alone = model.embed_images([_page(2)])[0]
    assert alone.shape == pages[1].shape
    np.testing.assert_allclose(alone, pages[1], atol=2e-3)
    assert model.score(queries[0], pages[0]) != 0.0


def test_render_target_follows_the_family_token_cap(family_model: tuple[str, Path, EmbeddingModel]) -> None:
    family, path, model = family_model
    target = render_target_for(ModelSettings(family=family, name_or_path=str(path)))  # type: ignore[arg-type]
    cap = family_spec(family).token_cap
    if cap == "visual_tokens":
        assert model.max_visual_tokens == RECIPES[family]["max_visual_tokens"]
        side = RECIPES[family]["patch"] * 2
        assert target.max_pixels == model.max_visual_tokens * side * side
    elif cap == "fixed_square":
        assert target.min_side == RECIPES[family]["image_size"]
    else:
        assert target.max_side == RECIPES[family]["longest_edge"]
