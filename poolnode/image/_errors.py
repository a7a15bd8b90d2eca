"""Errors raised by the guest image builder."""

from __future__ import annotations


class ImageBuildError(Exception):
    """The guest image could not be built; the message says which step failed and why.

    Kept free of the ``honeyfleet`` package so the builder can be used (and tested) on
    its own; the pool node maps it onto its own error hierarchy at its boundary.
    """


class MissingHostToolError(ImageBuildError):
    """A host program the builder needs is not installed."""

    def __init__(self, tool: str, package: str) -> None:
        super().__init__(
            f"host tool {tool!r} not found: install it with 'apt-get install {package}'"
        )
        self.tool = tool
        self.package = package
