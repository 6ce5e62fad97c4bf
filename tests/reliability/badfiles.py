"""Generated hostile inputs: a PDF that inflates far past its size, deep HTML, an oversize file."""

from __future__ import annotations

import zlib
from pathlib import Path


def pdf_bomb(path: Path, inflated_bytes: int) -> Path:
    """Write a one-page PDF whose content stream inflates to `inflated_bytes` of text operators.

    The file itself stays small (zlib packs the repeated operators about 300 to 1).
    """
    line = b"BT /F1 12 Tf 72 712 Td (famulus) Tj ET\n"
    compressor = zlib.compressobj(9)
    chunk = line * (1024 * 1024 // len(line))
    parts = [compressor.compress(chunk) for _ in range(max(1, inflated_bytes // len(chunk)))]
    stream = b"".join(parts) + compressor.flush()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream
        + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path


def nested_html(path: Path, depth: int, tag: str = "div") -> Path:
    path.write_text(f"<{tag}>" * depth + "The deepest text." + f"</{tag}>" * depth,
                    encoding="utf-8")
    return path


def oversize(path: Path, size: int) -> Path:
    """Create a sparse file of `size` bytes: large by its size, cheap on disk."""
    with path.open("wb") as out:
        out.truncate(size)
    return path
