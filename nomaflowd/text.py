"""Text from untrusted sources, made safe to show on one line (logs, notes, tables)."""

from __future__ import annotations


def escape(text: str) -> str:
    """`text` on one printable line: control and other invisible characters as escapes.

    A newline in a file name or a reason must not forge a record in a log or a note.
    Undecodable bytes of a name (os.fsdecode's surrogateescape) show as \\xNN; a
    backslash is doubled so every escape reads one way.
    """
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])  # \\n, \\x1b, \\u2028, \\U000e0001
    return "".join(out)
