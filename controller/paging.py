"""Opaque page tokens (AIP-158) and page-size limits for List RPCs."""

from __future__ import annotations

import base64
import binascii

from honeyfleet.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    """The page size to use: the default for 0, capped at MAX_PAGE_SIZE."""
    if requested < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(kind: str, position: str) -> str:
    """A page token that resumes listing ``kind`` after ``position``."""
    return base64.urlsafe_b64encode(f"{kind}:{position}".encode()).decode().rstrip("=")


def decode_token(kind: str, token: str) -> str | None:
    """The position in a page token of ``kind``; None for an empty token."""
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidArgument("page_token is malformed") from None
    prefix, sep, position = text.partition(":")
    if prefix != kind or not sep:
        raise InvalidArgument("page_token belongs to another listing")
    return position
