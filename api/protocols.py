"""What the API needs from the rest of the system, as protocols: the publisher, the
store's read side, the embedder and the blob writer. ``colstream run all`` passes its
in-process objects, the API opens its own (:mod:`colstream.api.lazy`), tests pass fakes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from colstream.infra.vectorstore import PayloadFilter
from colstream.schemas.events import DocumentRecord, UploadEvent

RANDOM_WEIGHTS_LABEL = "(random weights)"


class PublishedLike(Protocol):
    @property
    def offset(self) -> int | None: ...


class PublisherLike(Protocol):
    def publish_upload(self, event: UploadEvent) -> PublishedLike: ...

    def publish_delete(self, document_id: str) -> PublishedLike: ...


class RecordStoreLike(Protocol):
    """The slice of :class:`colstream.infra.vectorstore.VectorStore` the API reads."""

    def list_records(self) -> list[DocumentRecord]: ...

    def get_records(self, document_ids: Sequence[str]) -> dict[str, DocumentRecord]: ...

    def stats(self) -> dict[str, Any]: ...

    def count_pages(self, document_id: str | None = None, filter: PayloadFilter | None = None) -> int: ...

    def search(
        self,
        query: np.ndarray,
        limit: int = 10,
        document_id: str | None = None,
        prefetch: bool = True,
        filter: PayloadFilter | None = None,
    ) -> list[tuple[float, dict[str, Any]]]: ...


class EmbedderLike(Protocol):
    """The slice of :class:`colstream.embedding.model.EmbeddingModel` the API calls."""

    model_name: str
    is_random_weights: bool
    dim: int
    device: Any

    def embed_images(self, images: Sequence[Image.Image]) -> list[np.ndarray]: ...

    def embed_queries(self, texts: Sequence[str]) -> list[np.ndarray]: ...


class BlobWriterLike(Protocol):
    def put_file(self, path: Any, name: str, content_type: str | None = None) -> str: ...

    def delete(self, uri: str) -> None: ...


def model_label(model: EmbedderLike) -> str:
    if model.is_random_weights and RANDOM_WEIGHTS_LABEL not in model.model_name:
        return f"{model.model_name} {RANDOM_WEIGHTS_LABEL}"
    return model.model_name
