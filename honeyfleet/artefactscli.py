"""The ``honeyfleet artefacts`` and ``honeyfleet replay`` commands (ArtefactService).

    honeyfleet artefacts list [--session ID] [--kind K] [--sha256 X] [--since T] [--until T]
                              [--limit N] [--json]
    honeyfleet artefacts get SHA256 -o FILE
    honeyfleet replay SESSION|FILE [--speed X] [--max-idle S]

``get`` streams the content into FILE and checks its sha256 and size before FILE appears
(a mismatch leaves no file). ``replay`` plays a session's recording fetched from the
controller, or a local asciicast file (a path that exists). Every command takes the
admin TLS flags of ``honeyfleet status``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from honeyfleet.admincli import add_admin_flags
from honeyfleet.artefactclient import fetch
from honeyfleet.errors import NotFound
from honeyfleet.eventscli import add_time_flags, admin_call, paged, when
from honeyfleet.replay import play
from honeyfleet.termtext import cell
from honeyfleet.v1 import artefact_pb2, artefact_pb2_grpc

LIST_PAGE = 200
KINDS = {
    "capture": artefact_pb2.ARTEFACT_KIND_CAPTURE,
    "recording": artefact_pb2.ARTEFACT_KIND_RECORDING,
    "extracted_file": artefact_pb2.ARTEFACT_KIND_EXTRACTED_FILE,
    "download": artefact_pb2.ARTEFACT_KIND_DOWNLOAD,
}
KIND_NAMES = {value: name for name, value in KINDS.items()}


def positive_float(text: str) -> float:
    """argparse type: a number above zero."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``artefacts`` and ``replay`` commands to the main CLI's ``subparsers``."""
    artefacts = subparsers.add_parser(
        "artefacts", help="list and fetch what sensors and pool nodes captured"
    )
    sub = artefacts.add_subparsers(dest="artefacts_command", metavar="COMMAND", required=True)
    p = sub.add_parser("list", help="stored artefacts, newest first")
    p.add_argument("--session", default="", help="only artefacts of this session")
    p.add_argument("--kind", choices=sorted(KINDS), help="only artefacts of this kind")
    p.add_argument("--sha256", default="", help="only references to this content")
    add_time_flags(p)
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--json", action="store_true", help="print one JSON object a line")
    add_admin_flags(p)
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("get", help="fetch one artefact into a file (its sha256 checked)")
    p.add_argument("sha256", help="the artefact's sha256 (as events and `list` name it)")
    p.add_argument("-o", "--output", type=Path, required=True, help="file to write")
    add_admin_flags(p)
    p.set_defaults(func=_cmd_get)

    p = subparsers.add_parser(
        "replay", help="play a session's recording (from the controller, or a local file)"
    )
    p.add_argument("target", help="a session id, or a recording file (asciicast v2)")
    p.add_argument("--speed", type=positive_float, default=1.0, help="play faster (2 = twice)")
    p.add_argument(
        "--max-idle", type=positive_float, default=None, help="shorten pauses to this many seconds"
    )
    add_admin_flags(p)
    p.set_defaults(func=_cmd_replay)


def _call(args: argparse.Namespace, what: str, body: Any) -> int:
    """Run ``body(stub)`` with an ArtefactService stub."""
    return admin_call(args, what, artefact_pb2_grpc.ArtefactServiceStub, body)


def listed(
    stub: artefact_pb2_grpc.ArtefactServiceAsyncStub,
    request: artefact_pb2.ListArtefactsRequest,
    limit: int,
) -> AsyncIterator[artefact_pb2.Artefact]:
    """Up to ``limit`` references, following page tokens."""
    return paged(stub.ListArtefacts, request, lambda r: r.artefacts, limit, LIST_PAGE)


def _cmd_list(args: argparse.Namespace) -> int:
    """`artefacts list`: ListArtefacts as a table or JSON lines."""
    request = artefact_pb2.ListArtefactsRequest(
        session=args.session,
        sha256=args.sha256,
        kind=KINDS[args.kind] if args.kind else artefact_pb2.ARTEFACT_KIND_UNSPECIFIED,
    )
    if args.since:
        request.start_time.CopyFrom(args.since)
    if args.until:
        request.end_time.CopyFrom(args.until)

    async def body(stub: artefact_pb2_grpc.ArtefactServiceAsyncStub) -> None:
        """The command's calls and output."""
        found = [a async for a in listed(stub, request, args.limit)]
        if args.json:
            for artefact in found:
                _out(json.dumps(MessageToDict(artefact)))
            return
        table = Table(title=f"Artefacts ({len(found)}, newest first)", title_justify="left")
        for column in ("stored (UTC)", "kind", "bytes", "sha256", "session", "source", "name"):
            table.add_column(column)
        for a in found:
            m = a.metadata
            table.add_row(
                when(a.store_time),
                KIND_NAMES.get(m.kind, str(m.kind)),
                str(m.size),
                m.sha256,
                cell(m.session),
                cell(a.source),
                cell(m.filename),
            )
        Console(width=250).print(table)

    return _call(args, "ListArtefacts", body)


def _cmd_get(args: argparse.Namespace) -> int:
    """`artefacts get`: GetArtefact into a file, checked."""

    async def body(stub: artefact_pb2_grpc.ArtefactServiceAsyncStub) -> None:
        """The command's calls and output."""
        metadata = await fetch(stub, args.sha256, args.output)
        _out(f"{args.output}: {metadata.size} bytes, sha256 {args.sha256} checked")

    return _call(args, "GetArtefact", body)


def _cmd_replay(args: argparse.Namespace) -> int:
    """`replay`: play a local recording, or the session's recording from the controller."""
    local = Path(args.target)
    if local.is_file():
        return _play(local, args)
    with tempfile.TemporaryDirectory(prefix="honeyfleet-replay-") as scratch:
        cast = Path(scratch) / "session.cast"

        async def body(stub: artefact_pb2_grpc.ArtefactServiceAsyncStub) -> None:
            """Find the session's newest recording and fetch it."""
            request = artefact_pb2.ListArtefactsRequest(
                session=args.target, kind=artefact_pb2.ARTEFACT_KIND_RECORDING
            )
            found = [a async for a in listed(stub, request, 1)]
            if not found:
                raise NotFound(
                    f"no recording of session {args.target!r} in the controller's artefact "
                    "store (`honeyfleet sessions show` says whether one was made)"
                )
            await fetch(stub, found[0].metadata.sha256, cast)

        _call(args, "GetArtefact", body)
        return _play(cast, args)


def _out(text: str) -> None:
    """One line on stdout, flushed."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _play(path: Path, args: Any) -> int:
    """Play a recording to stdout with its original timing."""
    with contextlib.suppress(BrokenPipeError):  # e.g. piped into `head`
        play(path, sys.stdout, speed=args.speed, max_idle=args.max_idle)
    return 0
