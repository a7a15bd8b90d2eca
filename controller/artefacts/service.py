"""ArtefactService: uploads from sensors and pool nodes, listing and fetching for admins."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from controller.artefacts.index import Reference, RefQuery
from controller.artefacts.store import ArtefactStore, check_sha256
from controller.paging import decode_token, encode_token, page_size
from honeyfleet.authz import current_caller
from honeyfleet.errors import InvalidArgument
from honeyfleet.v1 import artefact_pb2, artefact_pb2_grpc

# Kinds as the index spells them (and operators read them).
KINDS = {
    artefact_pb2.ARTEFACT_KIND_CAPTURE: "capture",
    artefact_pb2.ARTEFACT_KIND_RECORDING: "recording",
    artefact_pb2.ARTEFACT_KIND_EXTRACTED_FILE: "extracted_file",
    artefact_pb2.ARTEFACT_KIND_DOWNLOAD: "download",
}
KIND_VALUES = {name: value for value, name in KINDS.items()}
# Attacker-chosen names and ids are cut to this many characters.
MAX_TEXT = 1024


class ArtefactServicer(artefact_pb2_grpc.ArtefactServiceServicer):
    """The fleet API of the artefact store."""

    def __init__(self, store: ArtefactStore) -> None:
        self._store = store

    async def Upload(
        self, requests: AsyncIterator[artefact_pb2.UploadRequest], context: Any
    ) -> AsyncIterator[artefact_pb2.UploadResponse]:
        """Metadata first, then (only for new content) the chunks."""
        first = await anext(aiter(requests), None)
        if first is None or not first.HasField("metadata"):
            raise InvalidArgument("the first message of an upload must carry its metadata")
        ref = _reference(first.metadata, str(current_caller().identity))
        if await self._store.reference_if_stored(ref):
            yield artefact_pb2.UploadResponse(status=artefact_pb2.UPLOAD_STATUS_ALREADY_STORED)
            return
        async with self._store.receive(ref) as upload:
            yield artefact_pb2.UploadResponse(status=artefact_pb2.UPLOAD_STATUS_SEND_CONTENT)
            async for request in requests:
                if not request.HasField("chunk"):
                    raise InvalidArgument("only chunks may follow the metadata")
                await upload.write(request.chunk)
            await upload.commit()
        yield artefact_pb2.UploadResponse(status=artefact_pb2.UPLOAD_STATUS_STORED)

    async def ListArtefacts(
        self, request: artefact_pb2.ListArtefactsRequest, context: Any
    ) -> artefact_pb2.ListArtefactsResponse:
        """References newest first, filtered."""
        size = page_size(request.page_size)
        if request.sha256:
            check_sha256(request.sha256)
        kind = ""
        if request.kind != artefact_pb2.ARTEFACT_KIND_UNSPECIFIED:
            kind = _kind_name(request.kind)
        rows = await self._store.references(
            RefQuery(
                limit=size + 1,
                session=request.session,
                kind=kind,
                sha256=request.sha256,
                start_us=_micros(request.start_time) if request.HasField("start_time") else None,
                end_us=_micros(request.end_time) if request.HasField("end_time") else None,
                before=_position(decode_token("artefacts", request.page_token)),
            )
        )
        token = ""
        if len(rows) > size:
            last = rows[size - 1]
            token = encode_token("artefacts", f"{last.stored_us}:{last.id}")
        return artefact_pb2.ListArtefactsResponse(
            artefacts=[_artefact(r) for r in rows[:size]], next_page_token=token
        )

    async def GetArtefact(
        self, request: artefact_pb2.GetArtefactRequest, context: Any
    ) -> AsyncIterator[artefact_pb2.GetArtefactResponse]:
        """The content's metadata (from its latest reference), then its bytes."""
        blob, chunks = await self._store.content(request.sha256)
        latest = await self._store.references(RefQuery(limit=1, sha256=blob.sha256))
        metadata = (
            _artefact(latest[0]).metadata
            if latest
            else artefact_pb2.ArtefactMetadata(sha256=blob.sha256, size=blob.size)
        )
        yield artefact_pb2.GetArtefactResponse(metadata=metadata)
        async for chunk in chunks:
            yield artefact_pb2.GetArtefactResponse(chunk=chunk)


def _reference(metadata: artefact_pb2.ArtefactMetadata, source: str) -> Reference:
    """The index's reference for an upload's metadata, stored now."""
    now = time.time_ns() // 1000
    capture = _micros(metadata.capture_time) if metadata.HasField("capture_time") else now
    return Reference(
        sha256=metadata.sha256,
        size=metadata.size,
        kind=_kind_name(metadata.kind),
        session=metadata.session[:MAX_TEXT],
        filename=metadata.filename[:MAX_TEXT],
        source=source,
        capture_us=capture,
        stored_us=now,
    )


def _kind_name(kind: int) -> str:
    """The index's name of a kind; InvalidArgument for an unknown or unset one."""
    try:
        return KINDS[kind]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(f"unknown artefact kind {kind}") from None


def _artefact(ref: Reference) -> artefact_pb2.Artefact:
    """A reference as the API returns it."""
    return artefact_pb2.Artefact(
        metadata=artefact_pb2.ArtefactMetadata(
            sha256=ref.sha256,
            size=ref.size,
            kind=KIND_VALUES[ref.kind],
            session=ref.session,
            filename=ref.filename,
            capture_time=_timestamp(ref.capture_us),
        ),
        source=ref.source,
        store_time=_timestamp(ref.stored_us),
    )


def _micros(stamp: Timestamp) -> int:
    """A Timestamp in microseconds since the epoch."""
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000


def _timestamp(micros: int) -> Timestamp:
    """Microseconds since the epoch as a Timestamp."""
    stamp = Timestamp()
    stamp.FromMicroseconds(micros)
    return stamp


def _position(token: str | None) -> tuple[int, int] | None:
    """(stored microseconds, id) from a page token's position, None for no token."""
    if token is None:
        return None
    micros, _, key = token.partition(":")
    try:
        return int(micros), int(key)
    except ValueError:
        raise InvalidArgument("page_token is malformed") from None
