"""Bulk import of precomputed vectors (NumPy `.npy` or arrays, Parquet), chunked and
resumable as `shoal import` is: chunk i is always rows [i*batch, (i+1)*batch) and
carries the request id `imp-<identity>-<i>`, where the identity names the file (path,
size, modification time, the ids sidecar's too), the collection (name and id) and the
batch. The progress file beside the input records the identity and the rows below which
every chunk was acknowledged; a rerun skips those and re-sends the later chunks under
the same request ids, which the shards apply at most once. Nothing skipped, nothing
duplicated. Memory: a chunk per request in flight (the `.npy` is memory-mapped, Parquet
read a record batch at a time)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import grpc
import numpy as np

from shoal_client.errors import InvalidArgument
from shoal_client.types import Document


@dataclass
class Identity:
    path: str
    bytes: int
    modified_ns: int
    ids: Optional[Tuple[str, int, int]]
    collection: str
    collection_id: int
    batch: int

    def tag(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def file_identity(p: str) -> Tuple[str, int, int]:
    path = os.path.realpath(p)
    st = os.stat(path)
    return path, st.st_size, st.st_mtime_ns


def progress_path(path: str, progress_file: Optional[str]) -> str:
    return progress_file or f"{path}.shoal-import"


def resume_from(progress_file: str, identity: Identity) -> int:
    """Rows already acknowledged by an earlier run of the same import (0 otherwise)."""
    try:
        p = json.loads(pathlib.Path(progress_file).read_text())
    except FileNotFoundError:
        return 0
    except ValueError as e:
        raise InvalidArgument(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the progress file {progress_file} is unreadable ({e}): remove it or pass restart=True",
        )
    if p.get("version") != 1 or p.get("identity") != json.loads(json.dumps(asdict(identity))):
        return 0
    return int(p.get("rows_done", 0))


def save_progress(progress_file: str, identity: Identity, rows_done: int, complete: bool) -> None:
    """Whole or not at all: written beside, synced, renamed."""
    tmp = progress_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"version": 1, "identity": asdict(identity), "rows_done": rows_done, "complete": complete}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, progress_file)


def _bad(path: str, row: Optional[int], why: str) -> InvalidArgument:
    where = f"{path}, row {row}" if row is not None else path
    return InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {why}")


class Source:
    """The rows of a file, by chunk: (first row, documents)."""

    def __init__(self, path: str, ids: Optional[str]) -> None:
        self.path = path
        self.ids_path = ids
        suffix = pathlib.Path(path).suffix.lower()
        if suffix == ".npy":
            try:
                self._array = np.load(path, mmap_mode="r")
            except (ValueError, OSError) as e:
                raise _bad(path, None, f"not a readable .npy file ({e})")
            if self._array.ndim != 2:
                raise _bad(path, None, f"a .npy of vectors is 2-d (rows × dimension), not {self._array.shape}")
            if self._array.dtype != np.float32:
                raise _bad(path, None, f"vectors must be float32, not {self._array.dtype}")
            self.rows = self._array.shape[0]
            self.dimension = self._array.shape[1]
            self._ids = self._read_ids(ids, self.rows)
            self.kind = "npy"
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise _bad(path, None, "reading Parquet needs pyarrow (pip install 'shoal-client[parquet]')")
            try:
                self._pq = pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises several kinds
                raise _bad(path, None, f"not a readable Parquet file ({e})")
            names = set(self._pq.schema_arrow.names)
            for col in ("id", "vector"):
                if col not in names:
                    raise _bad(path, None, f"no {col!r} column (columns: {sorted(names)})")
            self._columns = [c for c in ("id", "vector", "text", "metadata") if c in names]
            self.rows = self._pq.metadata.num_rows
            self.dimension = None
            self.kind = "parquet"
        else:
            raise _bad(path, None, "a .npy or .parquet file (other formats: `shoal import`)")

    @staticmethod
    def _read_ids(ids: Optional[str], rows: int) -> Optional[List[str]]:
        if ids is None:
            return None
        lines = pathlib.Path(ids).read_text().splitlines()
        if len(lines) != rows:
            raise _bad(ids, None, f"{len(lines)} ids for {rows} rows")
        for i, line in enumerate(lines):
            if not line:
                raise _bad(ids, i, "an empty id")
        return lines

    def chunks(self, batch: int, start_row: int) -> Iterator[Tuple[int, List[Document]]]:
        if self.kind == "npy":
            for first in range(start_row, self.rows, batch):
                block = np.asarray(self._array[first : first + batch])
                if not np.isfinite(block).all():
                    bad = first + int(np.argwhere(~np.isfinite(block))[0][0])
                    raise _bad(self.path, bad, "a NaN or infinite value")
                yield first, [
                    Document(id=self._ids[first + i] if self._ids else str(first + i), vector=block[i])
                    for i in range(block.shape[0])
                ]
            return
        row = 0
        pending: List[Document] = []
        pending_first = start_row
        for rb in self._pq.iter_batches(batch_size=batch, columns=self._columns):
            cols = {name: rb.column(name).to_pylist() for name in self._columns}
            for i in range(rb.num_rows):
                if row >= start_row:
                    vec = cols["vector"][i]
                    ident = cols["id"][i]
                    if ident is None or ident == "":
                        raise _bad(self.path, row, "an empty id")
                    if vec is None or len(vec) == 0:
                        raise _bad(self.path, row, "no vector")
                    meta = cols.get("metadata", [None] * rb.num_rows)[i]
                    if isinstance(meta, str):
                        try:
                            meta = json.loads(meta) if meta else None
                        except ValueError as e:
                            raise _bad(self.path, row, f"metadata is not JSON ({e})")
                    pending.append(
                        Document(id=str(ident), text=(cols.get("text") or [""] * rb.num_rows)[i] or "", metadata=meta, vector=vec)
                    )
                    if len(pending) == batch:
                        yield pending_first, pending
                        pending_first += batch
                        pending = []
                row += 1
        if pending:
            yield pending_first, pending


class Tracker:
    """Which chunks were acknowledged; the contiguous prefix is what the progress file
    records."""

    def __init__(self, start_row: int, batch: int, rows: int) -> None:
        self.batch = batch
        self.rows = rows
        self.done_below = start_row
        self.acked: Dict[int, int] = {}

    def ack(self, first_row: int, n: int) -> int:
        self.acked[first_row] = n
        while self.done_below in self.acked:
            self.done_below += self.acked.pop(self.done_below)
        return self.done_below
