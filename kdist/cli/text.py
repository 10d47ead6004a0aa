"""Names in text output: a file name may hold any byte but ``/`` and NUL, so a listing must not
let one print as two entries (``a\\nb``) or drive the terminal (escape sequences).

``printable`` writes a backslash as ``\\\\``, the usual C escapes (``\\n``, ``\\t``, ``\\r``) and
every other control character (C0, DEL, C1, and the bytes 0x80-0x9f of a name that is not UTF-8)
as ``\\xNN``, and the invisible characters that reorder or break a line (bidirectional
overrides and isolates, line and paragraph separators) as ``\\uNNNN``, so the text stays
unambiguous. JSON output is left as it is (already escaped).
"""

from __future__ import annotations

import datetime
import re

_NAMED = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
# C0, DEL, C1; and surrogate escapes of the raw bytes 0x80-0x9f (a non-UTF-8 name's C1 codes)
_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\udc80-\udc9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match) -> str:
    ch = m.group()
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if code == 0x061C or 0x200E <= code <= 0x2069:
        return f"\\u{code:04x}"
    return f"\\x{code - 0xdc00 if code >= 0xdc00 else code:02x}"


def printable(text: str) -> str:
    """``text`` with control characters and backslashes escaped (see the module)."""
    return _UNSAFE.sub(_escape, text)


def local_time(t: float) -> str:
    """Seconds since the epoch as this machine's local time, the way every listing shows it."""
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")
