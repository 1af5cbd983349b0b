"""The streaming JSON parser: a large upstream answer parsed in steps, with the event loop given turns.

Where an answer can be large (QIDO-RS pages, series lists, metadata, FHIR reads and searches), its
JSON is parsed once the body is in, by ijson's incremental C parser, a slice of ``PARSE_STEP``
bytes at a time with the event loop given a turn between slices, and each chunk of bytes is let go
as it is parsed. So no single step holds the interpreter for long (``json.loads`` of a 3 MB
ImagingStudy is one C call of 30-120 ms, which stalls every other request, /healthz included, even
from a worker thread); the bytes and the objects made from them never add up (the bytes shrink as
the objects grow); and an answer that breaks a bound costs only its bytes, as nothing is built
before the whole body is in (bridge/upstream/bounds.py reads it). A body that does not begin like
JSON (an HTML error page) stops the reading at its first byte. Bodies up to ``PARSE_AT_ONCE`` take
``json.loads``: a few milliseconds. Rows of a larger top-level array share their keys, as
json.loads's do.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import deque
from itertools import accumulate
from typing import Any

import httpx
import ijson

# Bytes of JSON parsed in one step: about 1-3 ms of C on this machine's cores.
PARSE_STEP = 64 * 1024
PARSE_AT_ONCE = 256 * 1024  # smaller bodies: one json.loads, 1-3 ms
_BOM = b"\xef\xbb\xbf"
_JSON_STARTS = frozenset(b'[{"-0123456789tfn')
# Deepest nesting accepted (json.loads stops near 1,000 too). DICOM JSON with nested sequences and
# FHIR resources stay under 30; ijson's memory grows with the square of the depth (every level's
# event carries its whole path): 40 kB of nested brackets took about a gigabyte.
MAX_DEPTH = 512
# A whole string, and the rest of one begun in an earlier piece; possessive, so a long string is
# one step for the regex engine, never a backtracking stack as long as the string.
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_STRING_END = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP_OF = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


class ParsedResponse(httpx.Response):
    """An answer whose JSON body was parsed as it was read: ``json()`` gives it, ``content`` is empty.

    ``empty`` says the body had nothing but white space. ``json()`` raises ValueError, as httpx's
    does, for an empty body or one that is not JSON.
    """

    def __init__(
        self, *args: Any, document: Any, error: ValueError | None, empty: bool, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._document = document
        self._error = error
        self.empty = empty

    def json(self, **kwargs: Any) -> Any:
        """The parsed body (ValueError if it was empty or not JSON)."""
        if self._error is not None:
            raise self._error
        return self._document



def cannot_be_json(first: bytes) -> bool:
    """Whether a body that begins with ``first`` cannot be JSON (past a BOM and white space)."""
    head = first[:4096].removeprefix(_BOM).lstrip()
    return bool(head) and head[0] not in _JSON_STARTS


class _Depth:
    """How deep a JSON text nests, followed piece by piece (brackets inside strings do not count)."""

    def __init__(self) -> None:
        self.depth = 0
        self.deepest = 0
        self._in_string = False
        self._escaped = False  # the piece before ended in a string, on an escaping backslash

    def see(self, piece: bytes) -> None:
        """Follow ``piece``, the text after the pieces seen before."""
        if not piece:
            return
        if self._in_string:
            if self._escaped:
                piece, self._escaped = piece[1:], False
            end = _STRING_END.match(piece)
            if end is None:  # the string goes on into the next piece
                self._escaped = _odd_backslashes(piece)
                return
            piece, self._in_string = piece[end.end() :], False
        outside = _STRING.sub(b"", piece)
        opened = outside.find(b'"')
        if opened >= 0:  # a string that goes on into the next piece
            self._in_string = True
            self._escaped = _odd_backslashes(piece)
            outside = outside[:opened]
        brackets = outside.translate(None, _NOT_BRACKETS)
        if brackets:
            levels = list(accumulate(map(_STEP_OF.__getitem__, brackets), initial=self.depth))
            self.deepest = max(self.deepest, max(levels))
            self.depth = levels[-1]


def _odd_backslashes(piece: bytes) -> bool:
    return (len(piece) - len(piece.rstrip(b"\\"))) % 2 == 1


def _shared(value: Any, keys: dict[str, str]) -> Any:
    """``value`` with every object key replaced by one shared copy (as json.loads shares them)."""
    if isinstance(value, dict):
        return {keys.setdefault(k, k): _shared(v, keys) for k, v in value.items()}
    if isinstance(value, list):
        return [_shared(v, keys) for v in value]
    return value


async def parse_chunks(chunks: list[bytes], size: int) -> tuple[Any, ValueError | None]:
    """The JSON document in ``chunks`` (``size`` bytes), parsed in steps; each chunk is let go once parsed.

    A top-level array (QIDO-RS rows) is taken row by row, each row's keys shared with the rows
    before it: ijson makes a new string for every key, a third more memory than json.loads for
    DICOM JSON. ijson's messages quote the text around a fault, which may be patient data: they
    are dropped.
    """
    not_json = ValueError("the body is not JSON")
    if size <= PARSE_AT_ONCE:
        try:
            return json.loads(b"".join(chunks)), None
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, too deep
            return None, not_json
    if chunks:
        chunks[0] = chunks[0].removeprefix(_BOM)
    rows = next((c.lstrip()[:1] for c in chunks if c.strip()), b"") == b"["
    found: list[Any] = ijson.sendable_list()
    # use_float: numbers as json.loads gives them (ijson's default makes Decimals)
    parser = ijson.items_coro(found, "item" if rows else "", use_float=True)
    kept: list[Any] = []
    keys: dict[str, str] = {}
    depth = _Depth()
    queue = deque(chunks)
    chunks.clear()
    try:
        while queue:
            chunk = queue.popleft()
            for start in range(0, len(chunk), PARSE_STEP):
                piece = chunk[start : start + PARSE_STEP]
                depth.see(piece)
                if depth.deepest > MAX_DEPTH:
                    return None, ValueError(f"the body nests deeper than {MAX_DEPTH} levels")
                parser.send(piece)
                if rows:
                    kept.extend(_shared(row, keys) for row in found)
                    del found[:]
                await asyncio.sleep(0)
            del chunk
        parser.close()
    except (ijson.JSONError, RecursionError):
        return None, not_json
    if rows:
        return kept, None
    return (found[0], None) if found else (None, not_json)

