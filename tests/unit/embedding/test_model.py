"""The embedding core on tiny random-weights checkpoints (CPU, fp32).

Checkpoints are built once per cache folder (``.colstream/models``) through the
same ``save_pretrained`` / ``from_pretrained`` path real checkpoints take.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from colstream.embedding.engine import EmbedItem, EmbedResult, PipelinedEmbedder
from colstream.embedding.model import EmbeddingModel, ModelLoadError, load_model
from colstream.embedding.profile import RenderTarget, default_model_id, render_target_for
from colstream.embedding.tiny import (
    MARKER_FILE,
    README_FILE,
    TINY_COLPALI_IMAGE_SIZE,
    TINY_COLQWEN2_MAX_VISUAL_TOKENS,
    build_tiny_checkpoint,
    ensure_tiny_checkpoint,
)
from colstream.infra.settings import ModelSettings

REPO = Path(__file__).resolve().parents[3]
MODEL_CACHE = REPO / ".colstream" / "models"
FIDELITY_TOLERANCE = 1e-3
FLOAT16_TOLERANCE = 4e-3
# Loading a model imports transformers and colpali-engine, several seconds by itself: tests
# that load one (or pool tokens with colpali-engine) run in the full suite, not in the quick tier.
loads_a_model = pytest.mark.slow


@pytest.fixture(scope="module", params=[pytest.param(f, marks=loads_a_model) for f in ("colqwen2", "colpali")])
def tiny_model(request: pytest.FixtureRequest) -> EmbeddingModel:
    family = request.param
    path = ensure_tiny_checkpoint(family, MODEL_CACHE)
    return load_model(ModelSettings(family=family, name_or_path=str(path), device="cpu"))


@pytest.fixture(scope="module")
def tiny_colqwen2() -> EmbeddingModel:
    path = ensure_tiny_checkpoint("colqwen2", MODEL_CACHE)
    return load_model(ModelSettings(family="colqwen2", name_or_path=str(path), device="cpu"))


def text_page(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for line in range(0, height - 20, 18):
        words = " ".join(f"w{rng.integers(0, 999)}" for _ in range(6))
        draw.text((10 + int(rng.integers(0, 30)), line), words, fill="black")
    return image


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def assert_real_rows(vectors: np.ndarray, dim: int) -> None:
    assert vectors.ndim == 2 and vectors.shape[1] == dim
    assert vectors.shape[0] > 0
    assert np.isfinite(vectors).all()
    # Real rows are L2-normalised; padding rows would be all zero (or NaN).
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, atol=1e-2)


# -- checkpoints ---------------------------------------------------------------


def test_tiny_checkpoints_load_through_from_pretrained_and_are_labelled(tiny_model: EmbeddingModel) -> None:
    folder = Path(tiny_model.model_name.split(" (")[0])
    assert tiny_model.is_random_weights
    assert "(random weights)" in tiny_model.model_name
    assert json.loads((folder / MARKER_FILE).read_text())["colstream_random_weights"] is True
    assert "RANDOM WEIGHTS" in (folder / README_FILE).read_text()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert tiny_model.dim == 128
    assert tiny_model.device.type == "cpu"


@loads_a_model
def test_tiny_build_is_deterministic_and_cached(tmp_path: Path) -> None:
    first = build_tiny_checkpoint("colpali", tmp_path / "a")
    second = build_tiny_checkpoint("colpali", tmp_path / "b")
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()

    cached = ensure_tiny_checkpoint("colpali", tmp_path / "cache")
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_checkpoint("colpali", tmp_path / "cache") == cached
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp


@loads_a_model
def test_real_checkpoint_is_not_labelled_random(tmp_path: Path) -> None:
    # A folder without the marker is a "real" checkpoint as far as labelling goes.
    folder = build_tiny_checkpoint("colqwen2", tmp_path / "real")
    (folder / MARKER_FILE).unlink()
    model = load_model(ModelSettings(family="colqwen2", name_or_path=str(folder), device="cpu"))
    assert not model.is_random_weights
    assert "random" not in model.model_name


def test_int8_without_cuda_is_a_clear_error() -> None:
    path = ensure_tiny_checkpoint("colpali", MODEL_CACHE)
    with pytest.raises(ModelLoadError, match="CUDA"):
        load_model(ModelSettings(family="colpali", name_or_path=str(path), device="cpu", quantization="int8"))


# -- render profile --------------------------------------------------------------


@pytest.mark.slow  # a child Python process
def test_profile_imports_without_torch() -> None:
    code = "import sys, colstream.embedding.profile; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_render_target_matches_what_the_model_consumes() -> None:
    assert default_model_id("colqwen2") == "vidore/colqwen2-v1.0"
    assert default_model_id("colpali") == "vidore/colpali-v1.2"
    assert render_target_for(ModelSettings(family="colqwen2")) == RenderTarget(max_pixels=768 * 28 * 28)
    assert render_target_for(ModelSettings(family="colqwen2", max_visual_tokens=512)).max_pixels == 512 * 784
    assert render_target_for(ModelSettings(family="colpali")) == RenderTarget(min_side=448)

    qwen = ensure_tiny_checkpoint("colqwen2", MODEL_CACHE)
    pali = ensure_tiny_checkpoint("colpali", MODEL_CACHE)
    # The tiny checkpoint's own cap is smaller than the configured 768 and wins.
    tiny_target = render_target_for(ModelSettings(family="colqwen2", name_or_path=str(qwen)))
    assert tiny_target.max_pixels == TINY_COLQWEN2_MAX_VISUAL_TOKENS * 28 * 28
    pali_target = render_target_for(ModelSettings(family="colpali", name_or_path=str(pali)))
    assert pali_target.min_side == TINY_COLPALI_IMAGE_SIZE


# -- model outputs ---------------------------------------------------------------


def test_page_outputs_only_real_tokens(tiny_model: EmbeddingModel) -> None:
    pages = [text_page(595, 842, 1), text_page(300, 120, 2)]
    outputs = tiny_model.embed_images(pages)
    for page, vectors in zip(pages, outputs, strict=True):
        assert vectors.dtype == np.float32
        assert_real_rows(vectors, 128)
        alone = tiny_model.preprocess_images([page])
        assert vectors.shape[0] == int(alone.tensors["attention_mask"].sum())
    if tiny_model.family == "colqwen2":
        # Pages of different size become different token counts: padding was stripped.
        assert outputs[0].shape[0] != outputs[1].shape[0]
        image_tokens = int(
            (
                tiny_model.preprocess_images([pages[0]]).tensors["input_ids"] == tiny_model.model.config.image_token_id
            ).sum()
        )
        assert image_tokens <= TINY_COLQWEN2_MAX_VISUAL_TOKENS


def test_page_vectors_do_not_depend_on_the_batch(tiny_model: EmbeddingModel) -> None:
    page = text_page(595, 842, 7)
    alone = tiny_model.embed_images([page])[0]
    batch = tiny_model.embed_images([text_page(842, 595, 8), page, text_page(180, 400, 9)])
    assert batch[1].shape == alone.shape
    assert float(np.abs(batch[1] - alone).max()) <= FIDELITY_TOLERANCE


def test_queries_use_the_processor_and_do_not_depend_on_the_batch(tiny_model: EmbeddingModel) -> None:
    short = "what is the total?"
    queries = tiny_model.embed_queries([short, "a much longer query about revenue growth in every region"])
    alone = tiny_model.embed_queries([short])[0]
    for vectors in queries:
        assert_real_rows(vectors, 128)
    assert queries[1].shape[0] > queries[0].shape[0]
    assert queries[0].shape == alone.shape
    assert float(np.abs(queries[0] - alone).max()) <= FIDELITY_TOLERANCE


def test_score_is_maxsim_as_colpali_engine_computes_it(tiny_model: EmbeddingModel) -> None:
    query = tiny_model.embed_queries(["invoice total"])[0]
    pages = tiny_model.embed_images([text_page(595, 842, 3), text_page(400, 400, 4)])
    ours = [tiny_model.score(query, page) for page in pages]
    reference = tiny_model.processor.score_multi_vector(
        [torch.from_numpy(query)], [torch.from_numpy(p) for p in pages]
    )[0]
    np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-5)


@loads_a_model
def test_colpali_drops_labels_and_keeps_one_logit_with_identical_vectors() -> None:
    path = ensure_tiny_checkpoint("colpali", MODEL_CACHE)
    model = load_model(ModelSettings(family="colpali", name_or_path=str(path), device="cpu"))
    pages = [text_page(595, 842, 5), text_page(842, 595, 6)]
    as_colpali_engine_calls_it = model.processor.process_images(pages)
    assert "labels" in as_colpali_engine_calls_it
    with torch.inference_mode():
        reference = model.model(**as_colpali_engine_calls_it)
    inputs = model.preprocess_images(pages)
    assert "labels" not in inputs.tensors
    assert torch.equal(model.forward(inputs), reference)


# -- pipelined engine ------------------------------------------------------------


def test_engine_matches_direct_model_call_and_isolates_a_corrupt_image(tiny_model: EmbeddingModel) -> None:
    pages = [text_page(595, 842, 11), text_page(842, 595, 12), text_page(250, 350, 13), text_page(595, 842, 14)]
    good_png = encode(pages[1])
    items = [
        EmbedItem("a", encode(pages[0], "JPEG")),
        EmbedItem("bad", b"\x89PNG\r\n\x1a\n not really an image"),
        EmbedItem("b", good_png),
        EmbedItem("truncated", good_png[: len(good_png) // 2]),
        EmbedItem("c", encode(pages[2])),
        EmbedItem("d", encode(pages[3])),
    ]
    with PipelinedEmbedder(tiny_model, max_batch_size=2, preprocess_workers=2) as engine:
        results = engine.embed_sync(items)

    assert [r.key for r in results] == [item.key for item in items]
    by_key = {r.key: r for r in results}
    for key in ("bad", "truncated"):
        assert by_key[key].vectors is None
        assert by_key[key].error and by_key[key].error_type
    decoded = [Image.open(io.BytesIO(items[i].image_bytes)).convert("RGB") for i in (0, 2, 4, 5)]
    direct = [tiny_model.embed_images([image])[0] for image in decoded]
    for key, expected in zip("abcd", direct, strict=True):
        got = by_key[key].vectors
        assert got is not None and got.dtype == np.float16
        assert got.shape == expected.shape
        assert float(np.abs(got.astype(np.float32) - expected).max()) <= FLOAT16_TOLERANCE


@loads_a_model
def test_engine_handles_empty_groups_and_many_concurrent_groups(tiny_colqwen2: EmbeddingModel) -> None:
    page_bytes = [encode(text_page(200 + 60 * i, 300, i)) for i in range(6)]
    with PipelinedEmbedder(tiny_colqwen2, max_batch_size=3, queue_depth=1) as engine:
        assert engine.submit([]).result(timeout=5) == []
        futures = [engine.submit([EmbedItem((g, i), b) for i, b in enumerate(page_bytes)]) for g in range(4)]
        groups = [f.result(timeout=60) for f in futures]
    reference = groups[0]
    for group_index, results in enumerate(groups):
        assert [r.key for r in results] == [(group_index, i) for i in range(len(page_bytes))]
        for got, ref in zip(results, reference, strict=True):
            assert got.vectors is not None and ref.vectors is not None
            assert np.array_equal(got.vectors, ref.vectors)
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([EmbedItem("late", page_bytes[0])])


@loads_a_model
def test_engine_splits_a_batch_on_out_of_memory(tiny_colqwen2: EmbeddingModel, monkeypatch: pytest.MonkeyPatch) -> None:
    real_forward = tiny_colqwen2.forward
    seen_sizes: list[int] = []

    def forward_with_small_memory(inputs):  # type: ignore[no-untyped-def]
        seen_sizes.append(inputs.size)
        if inputs.size > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(inputs)

    monkeypatch.setattr(tiny_colqwen2, "forward", forward_with_small_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    items = [EmbedItem(i, encode(text_page(300 + 40 * i, 420, i))) for i in range(8)]
    with PipelinedEmbedder(tiny_colqwen2, max_batch_size=8) as engine:
        first = engine.embed_sync(items)
        assert engine.safe_batch_size == 2
        assert engine.stats.oom_splits >= 1
        seen_sizes.clear()
        second = engine.embed_sync(items)
    assert all(r.vectors is not None for r in first)
    # Once the safe size is known, later groups are cut to it up front.
    assert seen_sizes and max(seen_sizes) <= 2
    monkeypatch.setattr(tiny_colqwen2, "forward", real_forward)
    for a, b in zip(first, second, strict=True):
        assert a.vectors is not None and b.vectors is not None
        assert float(np.abs(a.vectors.astype(np.float32) - b.vectors.astype(np.float32)).max()) <= FLOAT16_TOLERANCE


@loads_a_model
def test_engine_fails_the_group_when_the_model_itself_fails(
    tiny_colqwen2: EmbeddingModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_forward(inputs):  # type: ignore[no-untyped-def]
        raise RuntimeError("device lost")

    monkeypatch.setattr(tiny_colqwen2, "forward", broken_forward)
    with PipelinedEmbedder(tiny_colqwen2, max_batch_size=4) as engine:
        future = engine.submit([EmbedItem("x", encode(text_page(300, 300, 1)))])
        with pytest.raises(RuntimeError, match="device lost"):
            future.result(timeout=30)


@loads_a_model
def test_engine_refuses_oversized_images_before_decoding(tiny_colqwen2: EmbeddingModel) -> None:
    with PipelinedEmbedder(tiny_colqwen2, max_batch_size=2, max_image_pixels=100 * 100) as engine:
        results: list[EmbedResult] = engine.embed_sync(
            [EmbedItem("big", encode(text_page(300, 300, 1))), EmbedItem("ok", encode(text_page(90, 90, 2)))]
        )
    assert results[0].error_type == "ImageTooLargeError"
    assert results[1].vectors is not None
