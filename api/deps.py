"""What the API needs from the rest of the system, and how it gets it lazily.

The API starts in well under a second and serves ``/health`` even while Kafka,
Qdrant or the model are unavailable: each dependency is opened on first use
(and retried on the next request if opening failed). Anything passed in by the
caller (``colstream run all`` shares its in-process store; tests pass fakes) is
used as is and never closed here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
from PIL import Image

from colstream.infra.vectorstore import PayloadFilter
from colstream.schemas.events import DocumentRecord, UploadEvent

T = TypeVar("T")

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


class Lazy(Generic[T]):
    """One shared instance, built on first ``get()``; a failed build is retried next time."""

    def __init__(self, factory: Callable[[], T], *, given: T | None = None) -> None:
        self._factory = factory
        self._value: T | None = given
        self._owned = given is None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def peek(self) -> T | None:
        return self._value

    def get(self) -> T:
        value = self._value
        if value is not None:
            return value
        with self._lock:
            if self._value is None:
                self._value = self._factory()
            return self._value

    def close(self) -> None:
        """Close what this holder opened itself; injected instances belong to the caller."""
        with self._lock:
            value, owned = self._value, self._owned
            if owned:
                self._value = None
        if owned and value is not None:
            closer = getattr(value, "close", None)
            if callable(closer):
                closer()


class LazyProxy:
    """Forwards attribute access to a :class:`Lazy` value, for code that wants the object itself."""

    def __init__(self, lazy: Lazy[Any]) -> None:
        self._lazy = lazy

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lazy.get(), name)
