"""Multipart bodies written byte by byte, for tests that need layouts a client library would not send."""

from __future__ import annotations


def raw_body(
    parts: list[tuple[bytes, bytes]],
    boundary: bytes = b"xyz",
    preamble: bytes = b"",
    newline: bytes = b"\r\n",
) -> bytes:
    """A multipart body of (header lines, data) parts, with the given preamble and line ends."""
    out = [preamble]
    for headers, data in parts:
        out += [b"--" + boundary + newline, headers, newline + newline, data, newline]
    out.append(b"--" + boundary + b"--" + newline)
    return b"".join(out)
