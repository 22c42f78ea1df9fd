"""shoal-client: the Python client of shoal, a distributed dense-retrieval cluster.

    from shoal_client import Client
    c = Client.dev(".shoal-dev")            # or Client(nodes=..., coordinators=..., tls_ca=..., api_key=...)
    c.create_collection("docs", 384, model="all-MiniLM-L6-v2")
    c.ingest("docs", [{"id": "1", "text": "hello world"}])
    print(c.search("docs", "greeting").hits)

`AsyncClient` has the same methods as coroutines. Failures raise `ShoalError`
subclasses carrying the gRPC code and the server's message.
"""

from shoal_client.aio import AsyncClient
from shoal_client.client import Client
from shoal_client.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ShoalError,
    Unauthenticated,
    Unavailable,
)
from shoal_client.types import (
    Collection,
    CountResult,
    Document,
    Hit,
    ImportReport,
    ScrollPage,
    SearchResult,
    ShardAnswer,
)

__all__ = [
    "Client",
    "AsyncClient",
    "ShoalError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "Unauthenticated",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "Unavailable",
    "DeadlineExceeded",
    "Internal",
    "Document",
    "Hit",
    "SearchResult",
    "ShardAnswer",
    "CountResult",
    "ScrollPage",
    "Collection",
    "ImportReport",
]
