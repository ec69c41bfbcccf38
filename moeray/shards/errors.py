"""Errors of the shard store: each message names the file and, where one is at fault, the tensor."""

from __future__ import annotations

__all__ = ["ShardFormatError", "ShardNotFoundError"]


class ShardFormatError(ValueError):
    """A checkpoint file or index is malformed, lies about its layout, or names no expert."""


class ShardNotFoundError(FileNotFoundError, ShardFormatError):
    """A checkpoint directory, file or indexed file does not exist (also a ValueError)."""
