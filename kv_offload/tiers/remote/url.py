# SPDX-License-Identifier: Apache-2.0
"""Store URLs: the scheme picks the adapter; credentials are never shown."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact", "scheme_of"]


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-case (``""`` when there is none)."""
    try:
        return urlsplit(url).scheme.lower() if "://" in url else ""
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return ""


def redact(url: str) -> str:
    """``url`` with any user name and password replaced by ``***``, for logs and errors."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<unparsable url>"
    netloc = ("***@" if parts.username is not None or parts.password is not None else "") + host + port
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
