"""The one error type of the host pipeline.

Every input that cannot become a correct tensor raises `InputError` with a message that names the input
(its path, URL, index in the call, or record id), so that a user can find the bad record in a data set of
millions. A wrong tensor is never returned instead.
"""

from __future__ import annotations


class InputError(ValueError):
    """An image, video, message or text that the pipeline refuses, with the input named in the message."""


def describe(source: object, limit: int = 80) -> str:
    """A short printable name for an input: a path or URL as is, bytes and arrays by type and size."""
    if isinstance(source, str):
        if source.startswith("data:"):
            return f"data URI ({len(source)} chars)"
        return source if len(source) <= limit else source[: limit - 3] + "..."
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} raw bytes>"
    shape = getattr(source, "shape", None)
    if shape is not None:
        return f"<{type(source).__name__} shape={tuple(shape)}>"
    size = getattr(source, "size", None)
    mode = getattr(source, "mode", None)
    if mode is not None and size is not None:
        return f"<PIL image mode={mode} size={size}>"
    return f"<{type(source).__name__}>"
