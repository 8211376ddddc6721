"""The embedder adapter on a dummy page model: vectors for good page tasks, control
messages passed through in input order, dead letters with reasons for bad input and
bad output, claim-checked images, and backpressure when the model itself fails."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from colstream.consumers.embedder.stage import EmbedderHandler
from colstream.embedding.engine import PipelinedEmbedder
from colstream.embedding.model import ModelInputs
from colstream.infra.blobstore import open_blob_store
from colstream.infra.kafka import OutRecord, RecordPosition
from colstream.infra.settings import ColstreamSettings
from colstream.infra.stage_runner import Backpressure, RawRecord, StageRunner
from colstream.schemas import (
    DocumentDeleted,
    DocumentFailed,
    DocumentRef,
    PageFailed,
    PageTask,
    PageVectors,
    decode_vectors,
    encode,
)
from colstream.testing import DummyPageModel, InMemoryBroker, ListEmit, RunningStage, wait_until

MODEL = "dummy-page-model"
TOKENS, DIM = 16, 32
GROUP = "embedder-test"


class NaNPageModel(DummyPageModel):
    """Gives NaN vectors for pages whose first pixel is pure red, as a broken kernel might."""

    def forward(self, inputs: ModelInputs) -> torch.Tensor:
        out = super().forward(inputs)
        red = inputs.tensors["pixels"][:, 0] == 255.0
        out[red] = float("nan")
        return out


@pytest.fixture
def settings(tmp_path: Path) -> ColstreamSettings:
    (tmp_path / "blobs").mkdir()
    return ColstreamSettings().updated(kafka={"bootstrap_servers": "in-memory"}, state_dir=tmp_path,
                                       blob={"local_root": tmp_path / "blobs"}, shutdown={"grace_s": 2.0})


@pytest.fixture
def model() -> DummyPageModel:
    return NaNPageModel(dim=DIM, tokens=TOKENS)


@pytest.fixture
def handler(settings: ColstreamSettings, model: DummyPageModel) -> Iterator[EmbedderHandler]:
    engine = PipelinedEmbedder(model, max_batch_size=4, preprocess_workers=1)
    embedder = EmbedderHandler(settings, engine, MODEL, open_blob_store(settings))
    yield embedder
    embedder.close()


def png(color: tuple[int, int, int], size: tuple[int, int] = (24, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def ref(doc: str, version: int = 3) -> DocumentRef:
    return DocumentRef(document_id=doc, version=version, filename=f"{doc}.pdf")


def task(doc: str, number: int, total: int = 2, *, image: bytes | None = None, image_ref: str | None = None,
         image_b64: str | None = None) -> PageTask:
    if image_ref is None and image_b64 is None:
        image_b64 = base64.b64encode(image or png((10 * number, 120, 200))).decode()
    return PageTask(document=ref(doc), page_number=number, total_pages=total, width=24, height=32,
                    image_format="png", image_b64=image_b64, image_ref=image_ref)


def raw(value: bytes | None, offset: int, key: str = "d") -> RawRecord:
    return RawRecord(key=key, value=value, position=RecordPosition("documents.pages", 0, offset))


def records(*messages: Any) -> list[RawRecord]:
    return [raw(m if isinstance(m, bytes) else encode(m), offset) for offset, m in enumerate(messages)]


def embed(handler: EmbedderHandler, batch: list[RawRecord]) -> list[OutRecord]:
    emit = ListEmit()
    outputs = handler.submit(batch, emit).result(timeout=30)
    assert list(emit) == []  # the embedder emits nothing while it works: the runner produces its outputs
    return outputs


def test_a_page_task_becomes_page_vectors_of_the_model(handler: EmbedderHandler, settings: ColstreamSettings) -> None:
    [out] = embed(handler, records(task("d", 1)))
    assert (out.topic, out.key) == (settings.topics.vectors, "d")
    vectors = decode_vectors(out.value)
    assert isinstance(vectors, PageVectors)
    assert (vectors.document, vectors.page_number, vectors.total_pages) == (ref("d"), 1, 2)
    assert (vectors.model, vectors.dim, vectors.num_tokens) == (MODEL, DIM, TOKENS)
    array = vectors.to_array().astype(np.float32)
    assert np.isfinite(array).all()
    np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, atol=1e-2)
    # The dummy model reports a 4x4 grid of image tokens from token 0.
    assert (vectors.image_token_start, vectors.grid_rows, vectors.grid_cols) == (0, 4, 4)


def test_outputs_keep_input_order_with_control_messages_between_pages(
    handler: EmbedderHandler, settings: ColstreamSettings
) -> None:
    failed = PageFailed(document=ref("d"), page_number=2, total_pages=3, stage="splitter",
                        error_type="RenderTimeout", message="slow")
    deleted = DocumentDeleted(document=ref("gone", 9))
    doc_failed = DocumentFailed(document=ref("broken", 4), stage="splitter", error_type="BrokenDocument",
                                message="bad xref")
    outputs = embed(handler, records(task("d", 1, 3), failed, task("d", 3, 3), deleted, doc_failed))
    assert all(o.topic == settings.topics.vectors for o in outputs)
    messages = [decode_vectors(o.value) for o in outputs]
    assert [type(m).__name__ for m in messages] == [
        "PageVectors", "PageFailed", "PageVectors", "DocumentDeleted", "DocumentFailed"]
    assert messages[1] == failed and messages[3] == deleted and messages[4] == doc_failed
    assert [o.key for o in outputs] == ["d", "d", "d", "gone", "broken"]


def test_a_batch_of_only_control_messages_completes_without_the_model(
    handler: EmbedderHandler, model: DummyPageModel
) -> None:
    outputs = embed(handler, records(DocumentDeleted(document=ref("gone", 9))))
    assert [type(decode_vectors(o.value)).__name__ for o in outputs] == ["DocumentDeleted"]
    assert model.forward_calls == 0


@pytest.mark.parametrize(
    ("value", "error_type"),
    [(b"{", "InvalidJSON"), (b'{"type": "page"}', "InvalidPageMessage"), (None, "UnexpectedTombstone")],
)
def test_an_unreadable_record_is_only_dead_lettered(
    handler: EmbedderHandler, settings: ColstreamSettings, value: bytes | None, error_type: str
) -> None:
    [letter] = embed(handler, [raw(value, 5)])
    assert letter.topic == settings.topics.dlq
    body = json.loads(letter.value or b"")
    assert (body["stage"], body["error_type"], body["source_offset"]) == ("embedder", error_type, 5)


def failure_pair(outputs: list[OutRecord], settings: ColstreamSettings) -> tuple[dict[str, Any], PageFailed]:
    assert [o.topic for o in outputs] == [settings.topics.dlq, settings.topics.vectors]
    letter = json.loads(outputs[0].value or b"")
    failed = decode_vectors(outputs[1].value)
    assert isinstance(failed, PageFailed)
    return letter, failed


def test_an_image_that_is_not_base64_fails_its_page_with_a_reason(
    handler: EmbedderHandler, settings: ColstreamSettings
) -> None:
    outputs = embed(handler, records(task("d", 1, image_b64="%%% not base64 %%%"), task("d", 2)))
    letter, failed = failure_pair(outputs[:2], settings)
    assert (letter["error_type"], letter["document_id"], letter["page_number"]) == ("InvalidImageEncoding", "d", 1)
    assert (failed.stage, failed.error_type, failed.page_number, failed.total_pages) == (
        "embedder", "InvalidImageEncoding", 1, 2)
    # The good page of the same batch is embedded all the same.
    assert isinstance(decode_vectors(outputs[2].value), PageVectors)


def test_an_undecodable_image_fails_its_page(handler: EmbedderHandler, settings: ColstreamSettings) -> None:
    outputs = embed(handler, records(task("d", 1, image=b"\x89PNG but not really")))
    letter, failed = failure_pair(outputs, settings)
    assert letter["error_type"] == failed.error_type
    assert letter["error_type"] and letter["message"]


def test_nan_vectors_from_the_model_are_dead_lettered_not_published(
    handler: EmbedderHandler, settings: ColstreamSettings
) -> None:
    outputs = embed(handler, records(task("d", 1, image=png((255, 0, 0))), task("d", 2)))
    letter, failed = failure_pair(outputs[:2], settings)
    assert letter["error_type"] == "InvalidEmbedding" and "NaN" in letter["message"]
    assert failed.error_type == "InvalidEmbedding"
    good = decode_vectors(outputs[2].value)
    assert isinstance(good, PageVectors) and good.page_number == 2


def test_a_claim_checked_image_is_read_from_blob_storage(
    handler: EmbedderHandler, settings: ColstreamSettings
) -> None:
    uri = open_blob_store(settings).put_bytes("claims/d/v3/page-1.png", png((1, 2, 3)), content_type="image/png")
    [out] = embed(handler, records(task("d", 1, image_ref=uri)))
    assert isinstance(decode_vectors(out.value), PageVectors)
    missing = (settings.blob.local_root / "claims/d/v3/page-9.png").as_uri()
    letter, failed = failure_pair(embed(handler, records(task("d", 2, image_ref=missing))), settings)
    assert letter["error_type"] == failed.error_type and letter["error_type"].startswith("Blob")


def test_a_failing_model_is_backpressure_and_blames_no_page(
    handler: EmbedderHandler, model: DummyPageModel
) -> None:
    model.fail_forward = RuntimeError("CUDA error: device-side assert")
    future = handler.submit(records(task("d", 1)), ListEmit())
    with pytest.raises(Backpressure, match="embedding failed"):
        future.result(timeout=30)
    model.fail_forward = None
    assert len(embed(handler, records(task("d", 1)))) == 1


def test_the_runner_publishes_vectors_and_commits(handler: EmbedderHandler, settings: ColstreamSettings) -> None:
    broker = InMemoryBroker()
    for offset in range(3):
        broker.append(settings.topics.pages, "d", encode(task("d", offset + 1, 3)))
    runner = StageRunner(settings, handler, topics=[settings.topics.pages], group_id=GROUP, batch_size=2,
                         batch_timeout_ms=10, max_in_flight=2, consumer_factory=broker.consumer,
                         producer_factory=broker.producer)
    with RunningStage(runner) as running:
        wait_until(lambda: broker.committed_offset(GROUP, settings.topics.pages) == 3, what="commit")
        running.stop()
        assert running.error is None
    published = [decode_vectors(v) for v in broker.values(settings.topics.vectors)]
    assert [(type(m).__name__, m.page_number) for m in published if isinstance(m, PageVectors)] == [
        ("PageVectors", 1), ("PageVectors", 2), ("PageVectors", 3)]
