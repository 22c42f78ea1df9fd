"""The synchronous client: `Client(nodes=..., coordinators=...)`. Data calls go to the
nodes' public gRPC API (round robin, failing over to the next node on UNAVAILABLE);
collection administration to the coordinators (following the leader's address a
follower names). Every write carries a request id, so a retry after an unknown outcome
(a timeout, a lost connection) is applied once."""

from __future__ import annotations

import itertools
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import grpc

from shoal_client import _core, bulk
from shoal_client._core import DocLike, FilterLike
from shoal_client._proto.shoal import coordinator_pb2 as cpb
from shoal_client._proto.shoal import coordinator_pb2_grpc as cgrpc
from shoal_client._proto.shoal import node_pb2 as pb
from shoal_client._proto.shoal import node_pb2_grpc as ngrpc
from shoal_client.errors import InvalidArgument, from_rpc_error
from shoal_client.types import Collection, CountResult, Document, ImportReport, ScrollPage, SearchResult

class _Timeout(grpc.RpcError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self._message = message

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return self._message


_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class Client:
    """A shoal cluster. `nodes`: public addresses of worker nodes ("host:port", a list or
    comma-separated); `coordinators`: the coordinators' addresses (needed for collection
    administration and status). TLS with `tls_ca` (and a client certificate with
    `tls_cert`/`tls_key` when the cluster asks for one); `api_key` or `api_key_file`."""

    def __init__(
        self,
        nodes: Union[str, Sequence[str]] = "127.0.0.1:7201,127.0.0.1:7202",
        coordinators: Union[None, str, Sequence[str]] = None,
        *,
        api_key: Optional[str] = None,
        api_key_file: Optional[str] = None,
        tls_ca: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
        timeout: float = 30.0,
        patience: float = 30.0,
    ) -> None:
        self._s = _core.settings(nodes, coordinators, api_key, api_key_file, tls_ca, tls_cert, tls_key, timeout, patience)
        self._channels: Dict[str, grpc.Channel] = {}
        self._next = itertools.count()
        self._leader = 0

    @classmethod
    def dev(cls, data_dir: str = ".shoal-dev", **kw: Any) -> "Client":
        """The cluster `shoal dev --data-dir DATA_DIR` runs (its TLS files and root key)."""
        return cls(**{**_core.dev_settings(data_dir), **kw})

    def close(self) -> None:
        for c in self._channels.values():
            c.close()
        self._channels.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- plumbing -------------------------------------------------------------------

    def _channel(self, addr: str) -> grpc.Channel:
        c = self._channels.get(addr)
        if c is None:
            if self._s.credentials is not None:
                c = grpc.secure_channel(addr, self._s.credentials, options=_OPTIONS)
            else:
                c = grpc.insecure_channel(addr, options=_OPTIONS)
            self._channels[addr] = c
        return c

    def _node(self, method: str, req: Any, retry: bool = True, timeout: Optional[float] = None) -> Any:
        """`method` of the Shoal service on a node; retryable failures go to the next node
        until `patience` runs out."""
        nodes = self._s.nodes
        until = time.monotonic() + self._s.patience
        pause = 0.05
        start = next(self._next)
        for attempt in itertools.count():
            addr = nodes[(start + attempt) % len(nodes)]
            stub = ngrpc.ShoalStub(self._channel(addr))
            try:
                return getattr(stub, method)(req, timeout=timeout or self._s.timeout, metadata=_core.metadata(self._s))
            except grpc.RpcError as e:
                if not retry or e.code() not in _core.RETRYABLE or time.monotonic() + pause > until:
                    raise from_rpc_error(e, f"Shoal/{method} on {addr}") from None
                if (attempt + 1) % len(nodes) == 0:
                    time.sleep(pause)
                    pause = min(pause * 2, 1.0)
        raise AssertionError("unreachable")

    def _admin(self, method: str, req: Any, service: str = "Admin") -> Any:
        coords = self._s.coordinators
        if not coords:
            raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"{method} needs the coordinators' addresses (coordinators=...)")
        until = time.monotonic() + self._s.patience
        pause = 0.05
        while True:
            addr = coords[self._leader % len(coords)]
            stub = (cgrpc.AdminStub if service == "Admin" else cgrpc.ClusterMapStub)(self._channel(addr))
            try:
                return getattr(stub, method)(req, timeout=self._s.timeout, metadata=_core.metadata(self._s))
            except grpc.RpcError as e:
                if e.code() not in _core.RETRYABLE or time.monotonic() + pause > until:
                    raise from_rpc_error(e, f"{service}/{method} on {addr}") from None
                hint = _core.leader_hint(e)
                if hint and hint in coords:
                    self._leader = coords.index(hint)
                elif hint:
                    coords.append(hint)
                    self._leader = len(coords) - 1
                else:
                    self._leader += 1
                    time.sleep(pause)
                    pause = min(pause * 2, 1.0)

    # --- collections ------------------------------------------------------------------

    def create_collection(self, name: str, dimension: int, **kw: Any) -> Collection:
        """A collection. `model`: the encoder's id for text (e.g. "all-MiniLM-L6-v2"; none:
        vectors only); `metric` "ip" or "l2"; `shards`; `replication_factor` (0: 2);
        `write_quorum`; `index_fields` {"path": "keyword" | "number"} for filters."""
        wait = kw.pop("wait", True)
        r = self._admin("CreateCollection", _core.create_request(name, dimension, **kw))
        if wait:
            self._wait_ready(name)
        return _core.collection(r.collection, r.shards)

    def _wait_ready(self, name: str) -> None:
        """Until every node has the collection in its map and every shard answers (a
        complete count), within `patience`: writes and searches right after a create
        then need no retry of their own."""
        until = time.monotonic() + self._s.patience
        for addr in self._s.nodes:
            stub = ngrpc.ShoalStub(self._channel(addr))
            while True:
                try:
                    r = stub.Count(pb.CountRequest(collection=name), timeout=self._s.timeout, metadata=_core.metadata(self._s))
                    if not r.partial:
                        break
                except grpc.RpcError as e:
                    if e.code() not in _core.RETRYABLE | {grpc.StatusCode.NOT_FOUND}:
                        raise from_rpc_error(e, f"Shoal/Count on {addr}") from None
                if time.monotonic() > until:
                    raise from_rpc_error(_Timeout(f"collection {name!r} not ready on {addr} after {self._s.patience} s"), "create_collection")
                time.sleep(0.1)

    def describe_collection(self, name: str) -> Collection:
        r = self._admin("DescribeCollection", cpb.DescribeCollectionRequest(name=name))
        return _core.collection(r.collection, r.shards)

    def list_collections(self) -> List[Collection]:
        return [_core.collection(c) for c in self._admin("ListCollections", cpb.ListCollectionsRequest()).collections]

    def drop_collection(self, name: str) -> None:
        self._admin("DropCollection", cpb.DropCollectionRequest(name=name))

    def status(self) -> Dict[str, Any]:
        """The coordinator group (leader, members) and the nodes with their state."""
        s = self._admin("ClusterStatus", cpb.ClusterStatusRequest())
        n = self._admin("ListNodes", cpb.ListNodesRequest())
        return _core.status(s, n)

    def build_index(self, collection: str, timeout: float = 600.0) -> Dict[str, Any]:
        """A new IVF-PQ generation on every shard (a cluster operation); waits for it."""
        r = self._node("BuildIndex", pb.BuildIndexRequest(collection=collection), retry=False, timeout=timeout)
        return {"operation": r.operation, "state": r.state, "reason": r.reason, "nlist": r.nlist, "train_sample": r.train_sample}

    # --- writes -----------------------------------------------------------------------

    def ingest(self, collection: str, documents: Iterable[DocLike], *, batch_size: int = 256, request_id: Optional[str] = None) -> int:
        """Documents (`Document`s or dicts with id, text, metadata, vector), in requests of
        `batch_size`, each with its own request id (retried on an unknown outcome, applied
        once). Returns how many were acknowledged."""
        stem = request_id or _core.request_id()
        n = 0
        for i, chunk in enumerate(_core.batches(documents, batch_size)):
            self._node("Ingest", pb.IngestRequest(collection=collection, documents=chunk, request_id=f"{stem}-{i}"))
            n += len(chunk)
        return n

    def ingest_arrays(
        self,
        collection: str,
        vectors: Any,
        *,
        ids: Optional[Sequence[str]] = None,
        texts: Optional[Sequence[str]] = None,
        metadata: Optional[Sequence[Any]] = None,
        batch_size: int = 256,
    ) -> int:
        """Rows of a NumPy array (float32 after conversion) as documents; ids default to
        the row numbers."""
        return self.ingest(collection, _core.array_documents(vectors, ids, texts, metadata), batch_size=batch_size)

    def import_file(
        self,
        collection: str,
        path: str,
        *,
        ids: Optional[str] = None,
        batch_size: int = 256,
        concurrency: int = 4,
        progress_file: Optional[str] = None,
        restart: bool = False,
    ) -> ImportReport:
        """A `.npy` (float32; ids from the `ids` file, one a line, else the row numbers) or
        Parquet file (columns id, vector, optional text and metadata) into an existing
        collection, `concurrency` requests in flight; resumable (see `shoal_client.bulk`)."""
        t = time.monotonic()
        src = bulk.Source(path, ids)
        coll = self.describe_collection(collection)
        ident = bulk.Identity(
            *bulk.file_identity(path),
            ids=bulk.file_identity(ids) if ids else None,
            collection=coll.name,
            collection_id=coll.id,
            batch=batch_size,
        )
        prog = bulk.progress_path(path, progress_file)
        start = 0 if restart else bulk.resume_from(prog, ident)
        tracker = bulk.Tracker(start, batch_size, src.rows)
        tag = ident.tag()
        sent = 0

        def send(first: int, docs: List[Document]) -> int:
            chunk = [_core.to_document(d) for d in docs]
            self._node("Ingest", pb.IngestRequest(collection=coll.name, documents=chunk, request_id=f"imp-{tag}-{first // batch_size}"))
            return len(chunk)

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            running: Dict[Any, int] = {}
            for first, docs in src.chunks(batch_size, start):
                while len(running) >= concurrency:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for f in done:
                        bulk.save_progress(prog, ident, tracker.ack(running.pop(f), f.result()), False)
                running[pool.submit(send, first, docs)] = first
                sent += 1
            for f in list(running):
                bulk.save_progress(prog, ident, tracker.ack(running.pop(f), f.result()), False)
        bulk.save_progress(prog, ident, tracker.done_below, True)
        return ImportReport(rows=tracker.done_below - start, skipped=start, requests=sent, seconds=time.monotonic() - t, progress_file=prog)

    def delete(self, collection: str, ids: Sequence[str], *, request_id: Optional[str] = None) -> int:
        r = self._node("Delete", pb.DeleteRequest(collection=collection, ids=list(ids), request_id=request_id or _core.request_id()))
        return r.deleted

    def delete_by_filter(self, collection: str, filter: FilterLike) -> int:
        """Deletes what the filter admits (an empty filter is refused: drop the collection)."""
        req = pb.DeleteByFilterRequest(collection=collection)
        f = _core.to_filter(filter)
        if f is not None:
            req.filter.CopyFrom(f)
        return self._node("DeleteByFilter", req).deleted

    def set_payload(self, collection: str, id: str, metadata: Mapping[str, Any], *, merge: bool = False, if_version: int = 0) -> None:
        """Replaces a document's metadata (or merges keys into it) without sending its
        vector; `if_version` (Document.version): only over that version, else Aborted."""
        import json

        self._node(
            "SetPayload",
            pb.SetPayloadRequest(collection=collection, id=id, metadata_json=json.dumps(dict(metadata)), merge=merge, if_version=if_version),
        )

    # --- reads ------------------------------------------------------------------------

    def search(self, collection: str, query: Optional[str] = None, **kw: Any) -> SearchResult:
        """By text (`query`) or `vector`, or `like_id` (more like a stored document); `k`,
        `filter`, `mode` ("auto": hybrid for text, dense for a vector; "dense", "lexical",
        "hybrid"), `fusion` ("rrf" | "linear"), `dense_weight`, `rrf_k`, `fusion_depth`,
        `prf` (True or {"depth", "alpha", "beta"}), `nprobe`, `refine`, `exact`,
        `with_text`, `with_payload`. A partial answer says so (`partial`, `missing_shards`)."""
        return _core.search_result(self._node("Search", _core.search_request(collection, query, **kw)))

    def search_batch(self, collection: str, searches: Sequence[Mapping[str, Any]]) -> List[SearchResult]:
        """Many searches in one call (dense ones are one fan-out); each a dict of
        `search`'s arguments (`query` for text)."""
        r = self._node("SearchBatch", _core.batch_request(collection, searches))
        return [_core.search_result(x) for x in r.results]

    def get(self, collection: str, id: str, *, with_vector: bool = False) -> Optional[Document]:
        r = self._node("Get", pb.GetRequest(collection=collection, id=id, with_vector=with_vector))
        return _core.document(r.document, r.version) if r.found else None

    def count(self, collection: str, filter: FilterLike = None) -> CountResult:
        req = pb.CountRequest(collection=collection)
        f = _core.to_filter(filter)
        if f is not None:
            req.filter.CopyFrom(f)
        return _core.count_result(self._node("Count", req))

    def scroll(
        self,
        collection: str,
        filter: FilterLike = None,
        *,
        limit: int = 100,
        cursor: str = "",
        with_text: bool = False,
        with_payload: bool = False,
        with_vector: bool = False,
    ) -> ScrollPage:
        """A page of the collection's documents in storage order; pass its `cursor` on."""
        req = pb.ScrollRequest(collection=collection, limit=limit, cursor=cursor, with_text=with_text, with_payload=with_payload, with_vector=with_vector)
        f = _core.to_filter(filter)
        if f is not None:
            req.filter.CopyFrom(f)
        return _core.scroll_page(self._node("Scroll", req))

    def scroll_all(self, collection: str, filter: FilterLike = None, **kw: Any) -> Iterator[Document]:
        """Every document (passing the filter), page by page."""
        cursor = ""
        while True:
            page = self.scroll(collection, filter, cursor=cursor, **kw)
            yield from page.documents
            if not page.cursor:
                return
            cursor = page.cursor
