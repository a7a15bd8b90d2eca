"""The client side of ArtefactService: send a file, fetch one and check its sha256.

Shared by the sensors' and pool nodes' outbox (:mod:`honeyfleet.outbox`) and the
operators' CLI (:mod:`honeyfleet.artefactscli`). Files are read and written on worker
threads, a chunk at a time, so neither the event loop nor memory grows with a file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from honeyfleet.errors import InvalidArgument, Unavailable
from honeyfleet.v1 import artefact_pb2, artefact_pb2_grpc

CHUNK = 256 * 1024
# Seconds to wait for the server's answer to the metadata, for its final word, and for
# it to take each chunk.
ANSWER_TIMEOUT = 60.0


class ChecksumMismatch(InvalidArgument):
    """What arrived does not hash to the sha256 asked for."""


def file_sha256(path: Path) -> tuple[str, int]:
    """The sha256 and size of a file (blocking: run it on a thread)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


async def upload(
    stub: artefact_pb2_grpc.ArtefactServiceAsyncStub,
    metadata: artefact_pb2.ArtefactMetadata,
    path: Path,
) -> artefact_pb2.UploadStatus.ValueType:
    """Upload one file; ALREADY_STORED or STORED. AioRpcError for the server's refusals."""
    call: UploadCall = stub.Upload(None)
    try:
        await _write(call, artefact_pb2.UploadRequest(metadata=metadata))
        answer = await _answer(call)
        if answer.status == artefact_pb2.UPLOAD_STATUS_ALREADY_STORED:
            return answer.status
        if answer.status != artefact_pb2.UPLOAD_STATUS_SEND_CONTENT:
            raise Unavailable(f"unexpected upload answer {answer.status}")
        async for chunk in _chunks(path):
            await _write(call, artefact_pb2.UploadRequest(chunk=chunk))
        await call.done_writing()
        final = await _answer(call)
        if final.status != artefact_pb2.UPLOAD_STATUS_STORED:
            raise Unavailable(f"unexpected upload answer {final.status}")
        return final.status
    finally:
        call.cancel()


UploadCall = grpc.aio.StreamStreamCall[artefact_pb2.UploadRequest, artefact_pb2.UploadResponse]


async def _write(call: UploadCall, request: artefact_pb2.UploadRequest) -> None:
    """Send one request; the call's own status if the server ended it (unreachable, or
    refusing the upload)."""
    try:
        # Bounded: a controller that stops reading (flow control) must not hold the
        # uploader for ever.
        async with asyncio.timeout(ANSWER_TIMEOUT):
            await call.write(request)
    except asyncio.InvalidStateError:  # grpc.aio's answer to a write on an ended call
        raise await _ended(call) from None
    except TimeoutError:
        raise Unavailable(f"the controller took no data for {ANSWER_TIMEOUT:.0f}s") from None


async def _answer(call: UploadCall) -> artefact_pb2.UploadResponse:
    """The server's next answer; its refusal as AioRpcError (code and trailers kept)."""
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            answer = await call.read()
    except TimeoutError:
        raise Unavailable(f"no answer to an upload within {ANSWER_TIMEOUT:.0f}s") from None
    if isinstance(answer, artefact_pb2.UploadResponse):
        return answer
    raise await _ended(call)


async def _ended(call: UploadCall) -> Exception:
    """Why the call ended: its status as AioRpcError (trailers kept, for retry hints)."""
    code = await call.code()
    if code == grpc.StatusCode.OK:
        return Unavailable("the controller ended the upload without an answer")
    return grpc.aio.AioRpcError(
        code,
        await call.initial_metadata(),
        await call.trailing_metadata(),
        await call.details(),
        None,
    )


async def _chunks(path: Path) -> AsyncIterator[bytes]:
    """A file's bytes, read on a thread a chunk at a time."""
    file = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(file.read, CHUNK):
            yield chunk
    finally:
        file.close()


async def fetch(
    stub: artefact_pb2_grpc.ArtefactServiceAsyncStub, sha256: str, out: Path
) -> artefact_pb2.ArtefactMetadata:
    """Stream an artefact into ``out`` and check its sha256 and size before it appears
    there (ChecksumMismatch, and no file, if they differ); its metadata."""
    temp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.part")
    digest = hashlib.sha256()
    size = 0
    metadata: artefact_pb2.ArtefactMetadata | None = None
    file = await asyncio.to_thread(temp.open, "xb")
    try:
        async for response in stub.GetArtefact(artefact_pb2.GetArtefactRequest(sha256=sha256)):
            if response.HasField("metadata"):
                metadata = response.metadata
                continue
            digest.update(response.chunk)
            size += len(response.chunk)
            await asyncio.to_thread(file.write, response.chunk)
        await asyncio.to_thread(file.close)
        if metadata is None:
            raise Unavailable("the controller sent no metadata")
        if digest.hexdigest() != sha256 or size != metadata.size:
            raise ChecksumMismatch(
                f"received {size} bytes with sha256 {digest.hexdigest()}, "
                f"expected {metadata.size} bytes with sha256 {sha256}"
            )
        await asyncio.to_thread(os.replace, temp, out)
        return metadata
    finally:
        file.close()
        temp.unlink(missing_ok=True)
