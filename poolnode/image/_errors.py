"""Errors raised by the guest image builder."""

from __future__ import annotations

import grpc

from honeyfleet.errors import HoneyfleetError


class ImageBuildError(HoneyfleetError):
    """The guest image could not be built; the message says which step failed and why."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class MissingHostToolError(ImageBuildError):
    """A host program the builder needs is not installed."""

    def __init__(self, tool: str, package: str) -> None:
        super().__init__(
            f"host tool {tool!r} not found: install it with 'apt-get install {package}'"
        )
        self.tool = tool
        self.package = package
