"""Bounds on what attacker-sent strings may take in an event, for every role that writes events.

Attacker-sent strings (passwords, commands, host names, URLs, request lines, file
paths) can be any length, and the controller refuses an event whose JSON is over
``MAX_EVENT_JSON`` bytes, losing it. So every string field (a list of strings counting
as one) and the message is cut to at most ``MAX_EVENT_STRING`` bytes of UTF-8 JSON
(escapes included: what the controller counts); an event with more such fields than fit
at that size cuts each to an equal share of the limit instead. Fields that never need
that much are cut shorter (``FIELD_LIMITS``: credentials, host names). A cut value is
its prefix, with no marker added.

Messages are Cowrie's templates with ``{field}`` placeholders: attacker data in values
is safe, only the template's own braces are interpreted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from honeyfleet.events import MAX_EVENT_JSON

# Longest string field or message in an event, in bytes of UTF-8 JSON: long enough for
# the commands attackers send (base64 droppers), short enough that a message and two
# fields as long fit in one event.
MAX_EVENT_STRING = 64 * 1024
# What an event's keys, numbers and shared fields may take besides its strings.
EVENT_RESERVE = 16 * 1024
# Fields with a shorter bound: credentials (OpenSSH's sshd refuses passwords over 1 KiB)
# and host names (at most 253 bytes in DNS; the rest is an attacker's filler).
FIELD_LIMITS = {
    "username": 1024,
    "password": 1024,
    "dst_ip": 256,
    "orig_ip": 256,
}


def json_size(text: str) -> int:
    """Bytes ``text`` takes as a JSON string in an event (escapes included, quotes not)."""
    return len(json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8", "surrogatepass"))


def cut(text: str, limit: int) -> str:
    """``text``, or its longest prefix found that takes at most ``limit`` bytes of JSON."""
    if len(text) * 6 <= limit:  # no character takes more than six bytes as JSON
        return text
    # A character takes at least one byte, so no prefix longer than ``limit`` fits.
    text = text[:limit]
    while (over := json_size(text) - limit) > 0:
        # Dropping one character per byte over surely fits; the share of the limit in the
        # size may keep more. Either is shorter, so this ends.
        text = text[: max(len(text) - over, len(text) * limit // (limit + over))]
    return text


def cut_list(items: list[str], limit: int) -> list[str]:
    """The first of ``items`` that take at most ``limit`` bytes of JSON together."""
    if sum(len(item) * 6 + 3 for item in items) <= limit:
        return items
    kept: list[str] = []
    for item in items:
        limit -= json_size(item) + 3  # quotes and a comma
        if limit < 0:
            break
        kept.append(item)
    return kept


def is_strings(value: Any) -> bool:
    """Whether ``value`` is a string or a list of strings (the values :func:`cut` bounds)."""
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(item, str) for item in value)
    )


@dataclass(frozen=True)
class Bounded:
    """An event's own fields and message, cut to the bounds."""

    fields: dict[str, Any]
    message: str
    limit: int
    """Bytes of JSON each string got."""
    cut: list[str]
    """What was cut ("name (N long)"), for a log line; empty when nothing was."""


def bound(
    template: str,
    fields: Mapping[str, Any],
    message_args: Mapping[str, Any] | None = None,
    shared: Mapping[str, Any] | None = None,
) -> Bounded:
    """Cut ``fields`` to the bounds and format ``template`` into the event's message.

    The template sees ``shared`` (the event's context, not cut: session, src_ip...),
    the cut fields and ``message_args`` (values for the message only, cut too).
    """
    # Each string (or list of strings) and the message get an equal share of the limit.
    strings = sum(is_strings(v) for v in fields.values())
    limit = min(MAX_EVENT_STRING, (MAX_EVENT_JSON - EVENT_RESERVE) // (strings + 1))
    long: list[str] = []

    def bounded(name: str, value: Any) -> Any:
        most = min(limit, FIELD_LIMITS.get(name, limit))
        if isinstance(value, str):
            short: Any = cut(value, most)
        elif is_strings(value):
            short = cut_list(value, most)
        else:
            return value
        if len(short) < len(value):
            long.append(f"{name} ({len(value)} long)")
        return short

    cut_fields = {k: bounded(k, v) for k, v in fields.items()}
    args = {k: bounded(k, v) for k, v in (message_args or {}).items()}
    message = template.format(**{**(shared or {}), **cut_fields, **args})
    return Bounded(cut_fields, cut(message, limit), limit, long)
