"""Qdrant cluster settings (shards, replicas, write consistency) reach the collections
colstream creates on a server. Local mode ignores them, so this runs against the real
server binary and skips where it is absent."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from qdrant_client import QdrantClient

from colstream.infra.settings import QdrantSettings
from colstream.infra.vectorstore import IndexModel, PagePoint

MODEL = IndexModel(family="colqwen2", model_id="vidore/colqwen2-v1.0", revision="main", dim=16)


def test_cluster_layout_names_only_what_is_set() -> None:
    assert QdrantSettings().cluster_layout() == {}
    settings = QdrantSettings(shard_number=6, replication_factor=2, write_consistency_factor=2)
    assert settings.cluster_layout() == {"shard_number": 6, "replication_factor": 2, "write_consistency_factor": 2}
    assert settings.cluster_layout(sharded=False) == {"replication_factor": 2, "write_consistency_factor": 2}


def test_write_consistency_above_the_replicas_is_refused() -> None:
    with pytest.raises(ValidationError, match="exceeds replication_factor 2"):
        QdrantSettings(replication_factor=2, write_consistency_factor=3)
    with pytest.raises(ValidationError, match="exceeds replication_factor 1"):
        QdrantSettings(write_consistency_factor=2)


def test_a_new_index_on_a_server_gets_the_configured_shards_and_replicas(qdrant_url: str) -> None:
    from colstream.infra.vectorstore_qdrant import QdrantServerVectorStore

    alias = f"pages_cluster_{time.monotonic_ns()}"
    settings = QdrantSettings(url=qdrant_url, collection=alias, records_collection=f"{alias}_records",
                              shard_number=3, replication_factor=2, write_consistency_factor=2)
    store = QdrantServerVectorStore(settings)
    store.ensure_collections(model=MODEL)
    client = QdrantClient(url=qdrant_url)
    pages = client.get_collection(store.index_name).config.params
    records = client.get_collection(f"{alias}_records").config.params
    assert (pages.shard_number, pages.replication_factor, pages.write_consistency_factor) == (3, 2, 2)
    assert (records.shard_number, records.replication_factor, records.write_consistency_factor) == (1, 2, 2)
    store.close()


def _plain_pages(count: int, dim: int, seed: int = 0) -> list[PagePoint]:
    rng = np.random.default_rng(seed)
    return [
        PagePoint(document_id=f"doc-{i // 4}", version=1, page_number=i % 4 + 1, total_pages=4, filename=None,
                  blob_uri=None, model=MODEL.label,
                  vectors=rng.standard_normal((12, dim)).astype(np.float16))
        for i in range(count)
    ]


@pytest.mark.parametrize("kind", ["int8", "binary"])
def test_a_quantized_first_stage_is_configured_and_rescored_on_a_server(kind: str, qdrant_url: str) -> None:
    from qdrant_client import models as qm

    from colstream.infra.vectorstore_qdrant import QdrantServerVectorStore

    alias = f"pages_{kind}_{time.monotonic_ns()}"
    settings = QdrantSettings(url=qdrant_url, collection=alias, records_collection=f"{alias}_records",
                              quantization=kind, quantization_oversampling=4.0)
    store = QdrantServerVectorStore(settings)
    store.ensure_collections(model=MODEL)
    pages = _plain_pages(40, MODEL.dim)
    store.upsert_pages(pages)
    config = QdrantClient(url=qdrant_url).get_collection(store.index_name).config.quantization_config
    assert isinstance(config, qm.ScalarQuantization if kind == "int8" else qm.BinaryQuantization)
    query = pages[7].vectors[:4].astype(np.float32)
    exact = store.search(query, limit=5, exact=True)
    approximate = store.search(query, limit=5)
    # A page's own tokens find it first; rescoring returns exact MaxSim scores for what it keeps.
    assert (exact[0][1]["document_id"], exact[0][1]["page_number"]) == ("doc-1", 4)
    assert (approximate[0][1]["document_id"], approximate[0][1]["page_number"]) == ("doc-1", 4)
    assert approximate[0][0] == pytest.approx(exact[0][0], rel=1e-3)
    store.close()


def test_changing_the_quantization_setting_updates_an_existing_index(qdrant_url: str) -> None:
    from colstream.infra.vectorstore_qdrant import QdrantServerVectorStore

    alias = f"pages_requant_{time.monotonic_ns()}"
    base = QdrantSettings(url=qdrant_url, collection=alias, records_collection=f"{alias}_records")
    first = QdrantServerVectorStore(base)
    first.ensure_collections(model=MODEL)
    name = first.index_name
    first.close()
    client = QdrantClient(url=qdrant_url)
    assert client.get_collection(name).config.quantization_config is None
    second = QdrantServerVectorStore(base.model_copy(update={"quantization": "int8"}))
    second.ensure_collections(model=MODEL)
    assert second.index_name == name
    assert client.get_collection(name).config.quantization_config is not None
    second.close()


def test_the_embedded_store_refuses_quantization_instead_of_ignoring_it(tmp_path: Path) -> None:
    from colstream.infra.vectorstore_edge import EdgeVectorStore

    with pytest.raises(ValueError, match="needs a Qdrant server"):
        EdgeVectorStore(QdrantSettings(path=tmp_path / "q", quantization="binary"))
