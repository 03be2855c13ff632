"""Text from untrusted sources, made safe to show on one line (logs, notes, tables)."""

from __future__ import annotations


def escape(text: str, backslash: bool = True) -> str:
    """`text` on one printable line: control and other invisible characters as escapes.

    A newline in a file name or a reason must not forge a record in a log or a note.
    Undecodable bytes of a name (os.fsdecode's surrogateescape) show as \\xNN; a
    backslash is doubled so every escape reads one way (`backslash` False: left as it is,
    for a log line whose values were escaped already).
    """
    if text.isprintable() and (not backslash or "\\" not in text):
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\" and backslash:
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])  # \\n, \\x1b, \\u2028, \\U000e0001
    return "".join(out)


def for_terminal(text: str) -> str:
    """`text` as lines a terminal shows, not obeys: newlines and tabs stay, every other
    control character (ESC starting a sequence that clears the screen or sets the title,
    a CR that overwrites the line, BEL) and invisible format character is escaped as by
    escape(). Backslashes stay single: JSON shown this way still reads as JSON."""
    if text.isprintable():
        return text
    return "\n".join("\t".join(escape(part).replace("\\\\", "\\") for part in line.split("\t"))
                     for line in text.split("\n"))
