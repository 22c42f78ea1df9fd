"""Shared by the sync and asyncio clients: connection settings, request building from
Python values, and responses turned into the dataclasses of `types`. No I/O here."""

from __future__ import annotations

import json
import os
import pathlib
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import grpc

from shoal_client._proto.shoal import coordinator_pb2 as cpb
from shoal_client._proto.shoal import node_pb2 as pb
from shoal_client.errors import InvalidArgument
from shoal_client.types import (
    Collection,
    CountResult,
    Document,
    Hit,
    ScrollPage,
    SearchResult,
    ShardAnswer,
)

# The header a follower coordinator sets on UNAVAILABLE naming the leader.
LEADER_HEADER = "x-shoal-leader"
# Calls worth repeating (with the same request id for writes): the node, the shard's
# primary or the coordinator leader is moving or the outcome is unknown.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN}

FilterLike = Union[None, str, Mapping[str, Any], cpb.Filter]
DocLike = Union[Document, Mapping[str, Any]]


@dataclass
class Settings:
    nodes: List[str]
    coordinators: List[str]
    credentials: Optional[grpc.ChannelCredentials]
    api_key: Optional[str]
    timeout: float
    # How long a call keeps retrying retryable failures.
    patience: float


def settings(
    nodes: Union[str, Sequence[str]],
    coordinators: Union[None, str, Sequence[str]],
    api_key: Optional[str],
    api_key_file: Optional[str],
    tls_ca: Optional[str],
    tls_cert: Optional[str],
    tls_key: Optional[str],
    timeout: float,
    patience: float,
) -> Settings:
    split = lambda v: [a.strip() for a in v.split(",") if a.strip()] if isinstance(v, str) else list(v or [])
    node_list = split(nodes)
    if not node_list:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, "give at least one node address")
    if api_key is None and api_key_file:
        api_key = pathlib.Path(api_key_file).read_text().splitlines()[0].strip()
    creds = None
    if tls_ca:
        read = lambda p: pathlib.Path(p).read_bytes() if p else None
        if bool(tls_cert) != bool(tls_key):
            raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, "tls_cert and tls_key go together")
        creds = grpc.ssl_channel_credentials(
            root_certificates=read(tls_ca), private_key=read(tls_key), certificate_chain=read(tls_cert)
        )
    return Settings(node_list, split(coordinators), creds, api_key, timeout, patience)


def dev_settings(data_dir: str) -> Dict[str, Any]:
    """The connection `shoal dev --data-dir DIR` made: its nodes, coordinators, TLS files
    and root key (when it runs with them)."""
    d = pathlib.Path(data_dir)
    out: Dict[str, Any] = {
        "nodes": ["127.0.0.1:7201", "127.0.0.1:7202"],
        "coordinators": ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"],
    }
    if (d / "tls" / "ca.pem").exists():
        out.update(tls_ca=str(d / "tls" / "ca.pem"), tls_cert=str(d / "tls" / "client.pem"), tls_key=str(d / "tls" / "client.key"))
    if (d / "keys" / "root.key").exists():
        out["api_key_file"] = str(d / "keys" / "root.key")
    return out


def metadata(s: Settings) -> List[Tuple[str, str]]:
    return [("authorization", f"Bearer {s.api_key}")] if s.api_key else []


def leader_hint(e: grpc.RpcError) -> Optional[str]:
    for k, v in (e.trailing_metadata() or ()) if hasattr(e, "trailing_metadata") else ():
        if k == LEADER_HEADER and v:
            return v
    return None


def request_id() -> str:
    return "py-" + uuid.uuid4().hex


# --- requests ---------------------------------------------------------------------

def _value(v: Any) -> cpb.FieldValue:
    if isinstance(v, bool):
        return cpb.FieldValue(flag=v)
    if isinstance(v, (int, float)):
        return cpb.FieldValue(number=float(v))
    if isinstance(v, str):
        return cpb.FieldValue(keyword=v)
    raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"filter value {v!r}: a string, number or boolean")


def _condition(c: Mapping[str, Any]) -> cpb.Condition:
    if not isinstance(c, Mapping):
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"a filter condition is a dict, not {c!r}")
    if "filter" in c:
        return cpb.Condition(filter=to_filter(c["filter"]))
    key = c.get("key")
    tests = [k for k in c if k != "key"]
    if not isinstance(key, str) or len(tests) != 1:
        raise InvalidArgument(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"filter condition {dict(c)!r} needs a \"key\" and exactly one of match, in, range, exists",
        )
    t = tests[0]
    if t == "match":
        return cpb.Condition(key=key, match=_value(c[t]))
    if t == "in":
        return cpb.Condition(key=key, any=cpb.ValueList(values=[_value(v) for v in c[t]]))
    if t == "range":
        r = c[t]
        unknown = set(r) - {"gt", "gte", "lt", "lte"}
        if unknown:
            raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"range bounds are gt/gte/lt/lte, not {sorted(unknown)}")
        return cpb.Condition(key=key, range=cpb.Range(**{b: float(x) for b, x in r.items()}))
    if t == "exists":
        return cpb.Condition(key=key, exists=bool(c[t]))
    raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"unknown filter test {t!r} (match, in, range, exists)")


def to_filter(f: FilterLike) -> Optional[cpb.Filter]:
    """A filter from the JSON form the CLI's --filter takes (a dict or its text):
    {"must": [{"key": "year", "range": {"gte": 2000}}], "should": [...], "must_not": [...]}."""
    if f is None or isinstance(f, cpb.Filter):
        return f
    if isinstance(f, str):
        f = json.loads(f)
    unknown = set(f) - {"must", "should", "must_not"}
    if unknown:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"filter clauses are must, should, must_not; not {sorted(unknown)}")
    return cpb.Filter(**{k: [_condition(c) for c in f.get(k, [])] for k in ("must", "should", "must_not")})


_MODES = {"auto": pb.RETRIEVAL_MODE_AUTO, "dense": pb.RETRIEVAL_MODE_DENSE, "lexical": pb.RETRIEVAL_MODE_LEXICAL, "hybrid": pb.RETRIEVAL_MODE_HYBRID}
_FUSIONS = {"rrf": pb.FUSION_RRF, "linear": pb.FUSION_LINEAR}


def search_request(
    collection: str,
    query: Optional[str] = None,
    *,
    vector: Optional[Sequence[float]] = None,
    k: int = 10,
    filter: FilterLike = None,
    mode: str = "auto",
    fusion: str = "rrf",
    dense_weight: Optional[float] = None,
    rrf_k: int = 0,
    fusion_depth: int = 0,
    prf: Union[bool, Mapping[str, Any], None] = None,
    like_id: str = "",
    nprobe: int = 0,
    refine: int = 0,
    exact: bool = False,
    with_text: bool = False,
    with_payload: bool = False,
) -> pb.SearchRequest:
    if mode not in _MODES:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"mode {mode!r}: one of {sorted(_MODES)}")
    if fusion not in _FUSIONS:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"fusion {fusion!r}: one of {sorted(_FUSIONS)}")
    r = pb.SearchRequest(
        collection=collection,
        text=query or "",
        vector=_floats(vector) if vector is not None else [],
        k=k,
        nprobe=nprobe,
        refine=refine,
        exact=exact,
        with_text=with_text,
        with_payload=with_payload,
        mode=_MODES[mode],
        fusion=_FUSIONS[fusion],
        rrf_k=rrf_k,
        fusion_depth=fusion_depth,
        like_id=like_id,
    )
    f = to_filter(filter)
    if f is not None:
        r.filter.CopyFrom(f)
    if dense_weight is not None:
        r.dense_weight = dense_weight
    if prf:
        p = pb.Prf(enabled=True)
        if isinstance(prf, Mapping):
            p.depth = int(prf.get("depth", 0))
            if "alpha" in prf:
                p.alpha = float(prf["alpha"])
            if "beta" in prf:
                p.beta = float(prf["beta"])
        r.prf.CopyFrom(p)
    return r


def _floats(v: Any) -> List[float]:
    try:
        import numpy as np

        if isinstance(v, np.ndarray):
            return v.astype(np.float32, copy=False).ravel().tolist()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return [float(x) for x in v]


def to_document(d: DocLike) -> pb.Document:
    if isinstance(d, Mapping):
        d = Document(**d)
    meta = d.metadata
    return pb.Document(
        id=d.id,
        text=d.text or "",
        metadata_json=json.dumps(meta) if meta is not None else "",
        vector=_floats(d.vector) if d.vector is not None and len(d.vector) else [],
    )


def batches(docs: Iterable[DocLike], size: int) -> Iterable[List[pb.Document]]:
    chunk: List[pb.Document] = []
    for d in docs:
        chunk.append(to_document(d))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def array_documents(vectors: Any, ids: Optional[Sequence[str]], texts: Optional[Sequence[str]], metadata: Optional[Sequence[Any]], start: int = 0) -> Iterable[Document]:
    """Rows of a 2-d array as documents (ids default to the row numbers)."""
    import numpy as np

    a = np.asarray(vectors, dtype=np.float32)
    if a.ndim != 2:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"vectors must be 2-d (rows × dimension), not {a.shape}")
    for i in range(a.shape[0]):
        yield Document(
            id=str(ids[i]) if ids is not None else str(start + i),
            text=texts[i] if texts is not None else "",
            metadata=metadata[i] if metadata is not None else None,
            vector=a[i],
        )


# --- responses --------------------------------------------------------------------

def _meta(s: str) -> Optional[Dict[str, Any]]:
    return json.loads(s) if s else None


def search_result(r: pb.SearchResponse) -> SearchResult:
    return SearchResult(
        hits=[Hit(h.id, h.score, h.shard, h.text, _meta(h.metadata_json)) for h in r.hits],
        partial=r.partial,
        missing_shards=list(r.missing_shards),
        shards_answered=r.shards_answered,
        shards_total=r.shards_total,
        shards=[ShardAnswer(a.shard, a.answered, a.node, a.generation, a.error, a.plan) for a in r.shards],
        took_ms=r.took_ms,
    )


def document(d: pb.Document, version: int = 0) -> Document:
    return Document(d.id, d.text, _meta(d.metadata_json), list(d.vector), version)


def count_result(r: pb.CountResponse) -> CountResult:
    return CountResult(r.count, r.partial, list(r.missing_shards))


def scroll_page(r: pb.ScrollResponse) -> ScrollPage:
    return ScrollPage([document(d) for d in r.documents], r.cursor)


_KINDS = {"keyword": cpb.FIELD_KIND_KEYWORD, "number": cpb.FIELD_KIND_NUMBER}
_METRICS = {"ip": cpb.METRIC_INNER_PRODUCT, "l2": cpb.METRIC_L2}


def create_request(
    name: str,
    dimension: int,
    *,
    model: Optional[str] = None,
    metric: str = "ip",
    shards: int = 3,
    replication_factor: int = 0,
    write_quorum: int = 0,
    index_fields: Optional[Mapping[str, str]] = None,
) -> cpb.CreateCollectionRequest:
    if metric not in _METRICS:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"metric {metric!r}: ip or l2")
    fields = []
    for path, kind in (index_fields or {}).items():
        if kind not in _KINDS:
            raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"field {path!r}: kind keyword or number, not {kind!r}")
        fields.append(cpb.PayloadField(path=path, kind=_KINDS[kind]))
    r = cpb.CreateCollectionRequest(
        name=name,
        dimension=dimension,
        metric=_METRICS[metric],
        shard_count=shards,
        replication_factor=replication_factor,
        write_quorum=write_quorum,
        payload_fields=fields,
    )
    if model:
        # The content hash stays empty: nodes then check the model's dimension only.
        r.encoder.CopyFrom(cpb.EncoderRef(model_id=model))
    return r


def status(s: Any, n: Any) -> Dict[str, Any]:
    """ClusterStatus and ListNodes answers as one dict."""
    return {
        "leader": s.leader,
        "leader_addr": s.leader_api_addr,
        "term": s.term,
        "map_version": s.map_version,
        "members": [{"id": m.id, "api_addr": m.api_addr, "voter": m.voter} for m in s.members],
        "nodes": [
            {"id": x.id, "addr": x.addr, "state": cpb.NodeState.Name(x.state).removeprefix("NODE_STATE_").lower()}
            for x in n.nodes
        ],
    }


def batch_request(collection: str, searches: Sequence[Mapping[str, Any]]) -> pb.SearchBatchRequest:
    """Each search a dict of `search`'s arguments (`query` for text; `collection` to
    name another)."""
    return pb.SearchBatchRequest(
        searches=[
            search_request(s.get("collection", collection), s.get("query"), **{k: v for k, v in s.items() if k not in ("collection", "query")})
            for s in searches
        ]
    )


def collection(c: cpb.Collection, shards: Iterable[cpb.Shard] = ()) -> Collection:
    metric = {v: k for k, v in _METRICS.items()}.get(c.metric, str(c.metric))
    kinds = {v: k for k, v in _KINDS.items()}
    return Collection(
        name=c.name,
        id=c.id,
        dimension=c.dimension,
        metric=metric,
        shard_count=c.shard_count,
        replication_factor=c.replication_factor,
        model=c.encoder.model_id if c.HasField("encoder") else "",
        index_fields={f.path: kinds.get(f.kind, "unspecified") for f in c.payload_fields},
        shards=[
            {"index": s.index, "primary": s.primary, "epoch": s.epoch, "replicas": [r.node_id for r in s.replicas]}
            for s in shards
        ],
    )
