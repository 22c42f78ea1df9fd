"""The asyncio client: `AsyncClient`, the same methods as `Client`, awaited (grpc.aio).
The same retries, failover, leader following and request ids."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any, AsyncIterator, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import grpc
import grpc.aio

from shoal_client import _core, bulk
from shoal_client._core import DocLike, FilterLike
from shoal_client._proto.shoal import coordinator_pb2 as cpb
from shoal_client._proto.shoal import coordinator_pb2_grpc as cgrpc
from shoal_client._proto.shoal import node_pb2 as pb
from shoal_client._proto.shoal import node_pb2_grpc as ngrpc
from shoal_client.client import _OPTIONS, _Timeout
from shoal_client.errors import InvalidArgument, from_rpc_error
from shoal_client.types import Collection, CountResult, Document, ImportReport, ScrollPage, SearchResult


class AsyncClient:
    """See `shoal_client.Client`; every method is a coroutine."""

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
        self._channels: Dict[str, grpc.aio.Channel] = {}
        self._next = itertools.count()
        self._leader = 0

    @classmethod
    def dev(cls, data_dir: str = ".shoal-dev", **kw: Any) -> "AsyncClient":
        return cls(**{**_core.dev_settings(data_dir), **kw})

    async def close(self) -> None:
        for c in self._channels.values():
            await c.close()
        self._channels.clear()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _channel(self, addr: str) -> grpc.aio.Channel:
        c = self._channels.get(addr)
        if c is None:
            if self._s.credentials is not None:
                c = grpc.aio.secure_channel(addr, self._s.credentials, options=_OPTIONS)
            else:
                c = grpc.aio.insecure_channel(addr, options=_OPTIONS)
            self._channels[addr] = c
        return c

    async def _node(self, method: str, req: Any, retry: bool = True, timeout: Optional[float] = None) -> Any:
        nodes = self._s.nodes
        until = time.monotonic() + self._s.patience
        pause = 0.05
        start = next(self._next)
        for attempt in itertools.count():
            addr = nodes[(start + attempt) % len(nodes)]
            stub = ngrpc.ShoalStub(self._channel(addr))
            try:
                return await getattr(stub, method)(req, timeout=timeout or self._s.timeout, metadata=_core.metadata(self._s))
            except grpc.aio.AioRpcError as e:
                if not retry or e.code() not in _core.RETRYABLE or time.monotonic() + pause > until:
                    raise from_rpc_error(e, f"Shoal/{method} on {addr}") from None
                if (attempt + 1) % len(nodes) == 0:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 1.0)
        raise AssertionError("unreachable")

    async def _admin(self, method: str, req: Any) -> Any:
        coords = self._s.coordinators
        if not coords:
            raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"{method} needs the coordinators' addresses (coordinators=...)")
        until = time.monotonic() + self._s.patience
        pause = 0.05
        while True:
            addr = coords[self._leader % len(coords)]
            stub = cgrpc.AdminStub(self._channel(addr))
            try:
                return await getattr(stub, method)(req, timeout=self._s.timeout, metadata=_core.metadata(self._s))
            except grpc.aio.AioRpcError as e:
                if e.code() not in _core.RETRYABLE or time.monotonic() + pause > until:
                    raise from_rpc_error(e, f"Admin/{method} on {addr}") from None
                hint = _core.leader_hint(e)
                if hint and hint in coords:
                    self._leader = coords.index(hint)
                elif hint:
                    coords.append(hint)
                    self._leader = len(coords) - 1
                else:
                    self._leader += 1
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 1.0)

    async def create_collection(self, name: str, dimension: int, **kw: Any) -> Collection:
        wait = kw.pop("wait", True)
        r = await self._admin("CreateCollection", _core.create_request(name, dimension, **kw))
        if wait:
            await self._wait_ready(name)
        return _core.collection(r.collection, r.shards)

    async def _wait_ready(self, name: str) -> None:
        until = time.monotonic() + self._s.patience
        for addr in self._s.nodes:
            stub = ngrpc.ShoalStub(self._channel(addr))
            while True:
                try:
                    r = await stub.Count(pb.CountRequest(collection=name), timeout=self._s.timeout, metadata=_core.metadata(self._s))
                    if not r.partial:
                        break
                except grpc.aio.AioRpcError as e:
                    if e.code() not in _core.RETRYABLE | {grpc.StatusCode.NOT_FOUND}:
                        raise from_rpc_error(e, f"Shoal/Count on {addr}") from None
                if time.monotonic() > until:
                    raise from_rpc_error(_Timeout(f"collection {name!r} not ready on {addr} after {self._s.patience} s"), "create_collection")
                await asyncio.sleep(0.1)

    async def describe_collection(self, name: str) -> Collection:
        r = await self._admin("DescribeCollection", cpb.DescribeCollectionRequest(name=name))
        return _core.collection(r.collection, r.shards)

    async def list_collections(self) -> List[Collection]:
        r = await self._admin("ListCollections", cpb.ListCollectionsRequest())
        return [_core.collection(c) for c in r.collections]

    async def drop_collection(self, name: str) -> None:
        await self._admin("DropCollection", cpb.DropCollectionRequest(name=name))

    async def status(self) -> Dict[str, Any]:
        s = await self._admin("ClusterStatus", cpb.ClusterStatusRequest())
        n = await self._admin("ListNodes", cpb.ListNodesRequest())
        return _core.status(s, n)

    async def build_index(self, collection: str, timeout: float = 600.0) -> Dict[str, Any]:
        r = await self._node("BuildIndex", pb.BuildIndexRequest(collection=collection), retry=False, timeout=timeout)
        return {"operation": r.operation, "state": r.state, "reason": r.reason, "nlist": r.nlist, "train_sample": r.train_sample}

    async def ingest(self, collection: str, documents: Iterable[DocLike], *, batch_size: int = 256, request_id: Optional[str] = None) -> int:
        stem = request_id or _core.request_id()
        n = 0
        for i, chunk in enumerate(_core.batches(documents, batch_size)):
            await self._node("Ingest", pb.IngestRequest(collection=collection, documents=chunk, request_id=f"{stem}-{i}"))
            n += len(chunk)
        return n

    async def ingest_arrays(self, collection: str, vectors: Any, *, ids: Optional[Sequence[str]] = None, texts: Optional[Sequence[str]] = None, metadata: Optional[Sequence[Any]] = None, batch_size: int = 256) -> int:
        return await self.ingest(collection, _core.array_documents(vectors, ids, texts, metadata), batch_size=batch_size)

    async def import_file(self, collection: str, path: str, *, ids: Optional[str] = None, batch_size: int = 256, concurrency: int = 4, progress_file: Optional[str] = None, restart: bool = False) -> ImportReport:
        t = time.monotonic()
        src = bulk.Source(path, ids)
        coll = await self.describe_collection(collection)
        ident = bulk.Identity(*bulk.file_identity(path), ids=bulk.file_identity(ids) if ids else None, collection=coll.name, collection_id=coll.id, batch=batch_size)
        prog = bulk.progress_path(path, progress_file)
        start = 0 if restart else bulk.resume_from(prog, ident)
        tracker = bulk.Tracker(start, batch_size, src.rows)
        tag = ident.tag()
        slots = asyncio.Semaphore(max(1, concurrency))
        tasks = []

        async def send(first: int, docs: List[Document]) -> None:
            try:
                chunk = [_core.to_document(d) for d in docs]
                await self._node("Ingest", pb.IngestRequest(collection=coll.name, documents=chunk, request_id=f"imp-{tag}-{first // batch_size}"))
                bulk.save_progress(prog, ident, tracker.ack(first, len(chunk)), False)
            finally:
                slots.release()

        for first, docs in src.chunks(batch_size, start):
            await slots.acquire()
            tasks.append(asyncio.ensure_future(send(first, docs)))
        await asyncio.gather(*tasks)
        bulk.save_progress(prog, ident, tracker.done_below, True)
        return ImportReport(rows=tracker.done_below - start, skipped=start, requests=len(tasks), seconds=time.monotonic() - t, progress_file=prog)

    async def delete(self, collection: str, ids: Sequence[str], *, request_id: Optional[str] = None) -> int:
        r = await self._node("Delete", pb.DeleteRequest(collection=collection, ids=list(ids), request_id=request_id or _core.request_id()))
        return r.deleted

    async def delete_by_filter(self, collection: str, filter: FilterLike) -> int:
        req = pb.DeleteByFilterRequest(collection=collection)
        f = _core.to_filter(filter)
        if f is not None:
            req.filter.CopyFrom(f)
        return (await self._node("DeleteByFilter", req)).deleted

    async def set_payload(self, collection: str, id: str, metadata: Mapping[str, Any], *, merge: bool = False, if_version: int = 0) -> None:
        await self._node("SetPayload", pb.SetPayloadRequest(collection=collection, id=id, metadata_json=json.dumps(dict(metadata)), merge=merge, if_version=if_version))

    async def search(self, collection: str, query: Optional[str] = None, **kw: Any) -> SearchResult:
        return _core.search_result(await self._node("Search", _core.search_request(collection, query, **kw)))

    async def search_batch(self, collection: str, searches: Sequence[Mapping[str, Any]]) -> List[SearchResult]:
        r = await self._node("SearchBatch", _core.batch_request(collection, searches))
        return [_core.search_result(x) for x in r.results]

    async def get(self, collection: str, id: str, *, with_vector: bool = False) -> Optional[Document]:
        r = await self._node("Get", pb.GetRequest(collection=collection, id=id, with_vector=with_vector))
        return _core.document(r.document, r.version) if r.found else None

    async def count(self, collection: str, filter: FilterLike = None) -> CountResult:
        req = pb.CountRequest(collection=collection)
        f = _core.to_filter(filter)
        if f is not None:
            req.filter.CopyFrom(f)
        return _core.count_result(await self._node("Count", req))

    async def scroll(self, collection: str, filter: FilterLike = None, *, limit: int = 100, cursor: str = "", with_text: bool = False, with_payload: bool = False, with_vector: bool = False) -> ScrollPage:
        req = pb.ScrollRequest(collection=collection, limit=limit, cursor=cursor, with_text=with_text, with_payload=with_payload, with_vector=with_vector)
        f = _core.to_filter(filter)
        if f is not None:
            req.filter.CopyFrom(f)
        return _core.scroll_page(await self._node("Scroll", req))

    async def scroll_all(self, collection: str, filter: FilterLike = None, **kw: Any) -> AsyncIterator[Document]:
        cursor = ""
        while True:
            page = await self.scroll(collection, filter, cursor=cursor, **kw)
            for d in page.documents:
                yield d
            if not page.cursor:
                return
            cursor = page.cursor
