"""Keep hostile XML away from lxml: check every body the VEN receives before openleadr parses it.

lxml's schema-validating parser segfaults on a DTD entity (lxml 5.4 to 6.1.3), taking the whole
process down, and openleadr parses with it. So every response body the VEN's HTTP session reads
goes through ``check_xml`` first, inside ``read()`` of the session's response class (which also
stops reading past the size limit): a rejected body raises ``XmlRejected`` there, the client's
request path records it as rejected, and lxml never sees the bytes. ``harden_openleadr_parser``
also swaps openleadr's module parser for one that does not load DTDs, resolve entities or touch
the network (defence in depth, not the main guard).
"""

from __future__ import annotations

import hashlib
import re
from typing import NoReturn

import aiohttp

from gateway.errors import InputRejected

MAX_XML_BYTES = 1 << 20  # 1 MiB: a large oadrDistributeEvent is tens of kB
_CHUNK = 64 * 1024
# Any markup declaration other than a comment or CDATA: <!DOCTYPE, <!ENTITY, <!ELEMENT, <!ATTLIST.
_DECLARATION = re.compile(r"<!(?!--|\[CDATA\[)\s*([A-Za-z]*)")
_ENCODING = re.compile(r"""^\s*<\?xml[^>]*?\bencoding\s*=\s*["']([^"']+)["']""")

_HARDENED: set[int] = set()  # ids of parsers this module installed


class XmlRejected(InputRejected):
    """A body the guard refused before any XML parser saw it."""

    def __init__(self, reason: str, size: int, sha256: str) -> None:
        self.reason = reason
        self.size = size
        self.sha256 = sha256
        super().__init__(f"xml rejected: {reason}")


def check_xml(body: bytes, max_bytes: int = MAX_XML_BYTES) -> None:
    """Raise XmlRejected when a body is too large, not UTF-8, or carries a DTD declaration."""
    if len(body) > max_bytes:
        _reject(f"body of {len(body)} bytes exceeds the {max_bytes}-byte limit", body)
    if b"\x00" in body:  # NUL never appears in UTF-8 XML; it would let UTF-16 slip past the scan
        _reject("body contains NUL bytes", body)
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        _reject("body is not UTF-8", body)
    enc = _ENCODING.match(text)
    if enc and enc.group(1).strip().lower().replace("_", "-") not in ("utf-8", "utf8"):
        _reject(f"XML declaration names encoding {enc.group(1)!r}; only UTF-8 is accepted", body)
    decl = _DECLARATION.search(text)
    if decl:
        _reject(f"markup declaration '<!{decl.group(1)}' is not allowed", body)


def _reject(reason: str, body: bytes) -> NoReturn:
    """Raise XmlRejected carrying the body's size and digest, never the body."""
    raise XmlRejected(reason, len(body), hashlib.sha256(body).hexdigest())


def guarded_response_class(max_bytes: int = MAX_XML_BYTES) -> type[aiohttp.ClientResponse]:
    """Return an aiohttp response class whose read() bounds and checks the body (raising XmlRejected)."""

    class GuardedResponse(aiohttp.ClientResponse):
        """A response that reads at most ``max_bytes`` and refuses hostile XML."""

        async def read(self) -> bytes:
            """Read the body in bounded chunks, check it, and hand it on only if it is clean."""
            if self._body is None:
                try:
                    body = await self._read_bounded()
                    if body:
                        check_xml(body, max_bytes)
                except BaseException:
                    self.close()
                    raise
                # aiohttp's own read() returns a body already stored here and then releases
                # the connection; this keeps its bookkeeping intact.
                self._body = body
            return await super().read()

        async def _read_bounded(self) -> bytes:
            """Read the body, stopping as soon as it exceeds the limit."""
            declared = self.content_length
            if declared is not None and declared > max_bytes:
                raise XmlRejected(
                    f"declared Content-Length {declared} exceeds the {max_bytes}-byte limit", declared, ""
                )
            parts: list[bytes] = []
            size = 0
            while chunk := await self.content.read(_CHUNK):
                size += len(chunk)
                parts.append(chunk)
                if size > max_bytes:
                    head = b"".join(parts)
                    raise XmlRejected(
                        f"body exceeds the {max_bytes}-byte limit", size, hashlib.sha256(head).hexdigest()
                    )
            return b"".join(parts)

    return GuardedResponse


def harden_openleadr_parser() -> None:
    """Make openleadr validate with a parser that loads no DTD and resolves no entity (idempotent)."""
    from lxml import etree
    from openleadr import messaging

    if id(messaging.XML_PARSER) in _HARDENED:
        return
    parser = etree.XMLParser(
        schema=messaging.XML_SCHEMA,
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
    )
    messaging.XML_PARSER = parser
    _HARDENED.add(id(parser))
