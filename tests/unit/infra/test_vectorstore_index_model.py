"""An index belongs to one model: binding, refusal of another model, the model on every hit.

Edge runs everywhere; the server path runs against the real Qdrant server binary
(qdrant-client's local mode has no aliases) and skips where it is absent.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from colstream.infra.settings import QdrantSettings
from colstream.infra.vectorstore import IndexModel, IndexModelMismatch, PagePoint, VectorStore
from colstream.infra.vectorstore_edge import EdgeVectorStore

DIM = 16
COLPALI = IndexModel(family="colpali", model_id="vidore/colpali-v1.2", revision="main", dim=DIM)
COLQWEN2 = IndexModel(family="colqwen2", model_id="vidore/colqwen2-v1.0", revision="main", dim=DIM)


def page(model: IndexModel, document_id: str = "doc", page_number: int = 1) -> PagePoint:
    vectors = np.random.default_rng(page_number).standard_normal((6, model.dim)).astype(np.float16)
    return PagePoint(document_id=document_id, version=1, page_number=page_number, total_pages=2, filename=None,
                     blob_uri=None, model=model.label, vectors=vectors)


def _open(backend: str, tmp_path: Path, request: pytest.FixtureRequest, alias: str) -> VectorStore:
    if backend == "edge":
        return EdgeVectorStore(QdrantSettings(path=tmp_path / "q", collection=alias))
    from colstream.infra.vectorstore_qdrant import QdrantServerVectorStore

    url = request.getfixturevalue("qdrant_url")
    return QdrantServerVectorStore(QdrantSettings(url=url, collection=alias))


# "server" is the session's Qdrant server: the full suite runs it, the quick tier does not.
@pytest.mark.parametrize("backend", ["edge", pytest.param("server", marks=pytest.mark.slow)])
def test_index_records_its_model_and_refuses_another_model_without_writing(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    alias = f"pages_{backend}_{time.monotonic_ns()}"
    store = _open(backend, tmp_path, request, alias)
    store.ensure_collections(model=COLPALI)
    assert store.index_model() == COLPALI
    store.upsert_pages([page(COLPALI, page_number=1), page(COLPALI, page_number=2)])
    hits = store.search(np.ones((2, DIM), dtype=np.float32), limit=5)
    assert [payload["model"] for _, payload in hits] == [COLPALI.label, COLPALI.label]
    store.close()

    other = _open(backend, tmp_path, request, alias)
    assert other.index_model() == COLPALI  # recorded with the index, found through the alias
    with pytest.raises(IndexModelMismatch) as refused:
        other.ensure_collections(model=COLQWEN2)
    message = str(refused.value)
    assert "vidore/colpali-v1.2" in message and "vidore/colqwen2-v1.0" in message
    assert "colstream migrate start --family colqwen2 --name-or-path vidore/colqwen2-v1.0" in message
    # Nothing was written and no second index appeared behind the alias.
    assert other.count_pages() == 2
    assert other.index_model() == COLPALI
    assert other.stats()["model"]["model_id"] == "vidore/colpali-v1.2"
    other.ensure_collections(model=COLPALI)  # the index's own model still opens it
    other.close()


def test_edge_index_is_named_by_model_behind_the_alias(tmp_path: Path) -> None:
    store = EdgeVectorStore(QdrantSettings(path=tmp_path / "q"))
    store.ensure_collections(model=COLQWEN2)
    name = store.stats()["index"]
    assert name.startswith("colpali_embeddings--colqwen2-v1.0--")
    assert (tmp_path / "q" / name / "edge_config.json").is_file()
    store.close()


def test_index_from_before_models_were_recorded_is_adopted_only_by_the_model_of_its_pages(tmp_path: Path) -> None:
    import json

    store = EdgeVectorStore(QdrantSettings(path=tmp_path / "q"))
    store.ensure_collections(model=COLPALI)
    store.upsert_pages([page(COLPALI)])
    index_dir = tmp_path / "q" / store.stats()["index"]
    store.close()
    # What an older release left behind: a shard named like the alias, a layout without a model.
    (tmp_path / "q" / "colstream_aliases.json").unlink()
    index_dir.rename(tmp_path / "q" / "colpali_embeddings")
    sidecar = tmp_path / "q" / "colpali_embeddings" / "colstream_layout.json"
    layout = json.loads(sidecar.read_text())
    layout.pop("model")
    sidecar.write_text(json.dumps(layout))

    legacy = EdgeVectorStore(QdrantSettings(path=tmp_path / "q"))
    assert legacy.index_model() is None
    with pytest.raises(IndexModelMismatch, match=r"vidore/colpali-v1\.2"):
        legacy.ensure_collections(model=COLQWEN2)
    legacy.ensure_collections(model=COLPALI)
    assert legacy.index_model() == COLPALI
    legacy.close()
