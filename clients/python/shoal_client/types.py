"""What the client returns: plain dataclasses (metadata as parsed JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class Document:
    """A document to ingest or one read back. `vector` empty: the cluster encodes `text`."""

    id: str
    text: str = ""
    metadata: Optional[Dict[str, Any]] = None
    vector: List[float] = field(default_factory=list)
    # Read back only: the sequence number of the write that stored this version
    # (`set_payload(if_version=...)`).
    version: int = 0


@dataclass
class Hit:
    id: str
    score: float
    shard: int
    text: str = ""
    metadata: Optional[Dict[str, Any]] = None


@dataclass
class ShardAnswer:
    """One shard's part of a search: who answered, from which index generation, how a
    filter ran (plan), or why it did not answer."""

    shard: int
    answered: bool
    node: str
    generation: int
    error: str
    plan: str


@dataclass
class SearchResult:
    hits: List[Hit]
    # True when a shard did not answer: `missing_shards` names them. Never silent.
    partial: bool
    missing_shards: List[int]
    shards_answered: int
    shards_total: int
    shards: List[ShardAnswer]
    took_ms: float


@dataclass
class CountResult:
    count: int
    partial: bool
    missing_shards: List[int]


@dataclass
class ScrollPage:
    documents: List[Document]
    # The next page's cursor; empty: this was the last page.
    cursor: str


@dataclass
class Collection:
    name: str
    id: int
    dimension: int
    metric: str
    shard_count: int
    replication_factor: int
    model: str
    # Indexed metadata fields for filters: {"path": "keyword" | "number"}.
    index_fields: Dict[str, str]
    shards: List[Dict[str, Any]] = field(default_factory=list)


@dataclass
class ImportReport:
    rows: int
    skipped: int
    requests: int
    seconds: float
    progress_file: str
