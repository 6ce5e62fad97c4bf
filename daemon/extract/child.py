"""The extraction child process: reads requests from stdin, writes results to stdout.

Started by `famulus.daemon.extract.sandbox`. Each request is one JSON line
`{"path": str, "max_bytes": int}`; each reply is one JSON line, either
`{"ok": true, "text", "format", "pages", "notes"}` or
`{"ok": false, "reason", "message", "permanent"}`. A request with `"op": "image"` and
`max_side_px`, `max_pixels` decodes an image instead and replies
`{"ok": true, "pixels" (base64 RGB, HWC), "shape", "format", "source_size"}`. The
address-space limit is set before any document is read, so a file that decompresses to
gigabytes fails here with MemoryError instead of taking the daemon's memory.
"""

from __future__ import annotations

import json
import pathlib
import resource
import sys
from typing import Any

from famulus.daemon.extract import ExtractionError, extract_text
from famulus.daemon.extract.image import decode_image


def _reply(data: dict[str, Any]) -> None:
    # ensure_ascii: text with lone surrogates (from undecodable bytes) still encodes.
    sys.stdout.write(json.dumps(data, ensure_ascii=True) + "\n")
    sys.stdout.flush()


def _error(reason: str, message: str, permanent: bool = True) -> dict[str, Any]:
    return {"ok": False, "reason": reason, "message": message, "permanent": permanent}


def serve(memory_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    for line in sys.stdin:
        request = json.loads(line)
        path = pathlib.Path(request["path"])
        out_of_memory = False
        try:
            result = _run(request, path)
        except ExtractionError as exc:
            _reply(_error(exc.reason, str(exc), exc.permanent))
            continue
        except MemoryError:
            # Replied to below: leaving this block frees the traceback and, with it, the
            # parser's objects, so there is memory left to reply.
            out_of_memory = True
        except RecursionError:
            _reply(_error("corrupt", f"{path} is nested too deeply to extract"))
            continue
        except Exception as exc:
            # A parser bug on odd input must cost one document, not the child.
            _reply(_error("corrupt", f"extracting text from {path} failed: "
                          f"{type(exc).__name__}: {exc}"))
            continue
        if out_of_memory:
            _reply(_error("memory", f"extracting text from {path} needed more than "
                          f"{memory_bytes:,} bytes of memory; raise extract.max_memory_bytes "
                          "in the famulus config to allow more"))
            # The heap may stay fragmented near the limit: the next file gets a new child.
            return
        _reply(result)


def _run(request: dict[str, Any], path: pathlib.Path) -> dict[str, Any]:
    max_bytes = int(request["max_bytes"])
    if request.get("op") == "image":
        image = decode_image(path, max_bytes=max_bytes,
                             max_side_px=int(request["max_side_px"]),
                             max_pixels=int(request["max_pixels"]))
        return {"ok": True, **image.to_message(), "format": image.format,
                "source_size": [image.source_width, image.source_height]}
    extracted = extract_text(path, max_bytes=max_bytes)
    return {"ok": True, "text": extracted.text, "format": extracted.format,
            "pages": extracted.pages, "notes": list(extracted.notes)}

if __name__ == "__main__":
    serve(int(sys.argv[1]))
