"""Images in watched folders: decoding in the sandbox, and a real daemon with a tiny LLaVA.

The tiny random LLaVA of tests/tiny_models.py is built and exported once per session by
tests/tiny_llava.py, run with the interpreter of the `export` extra: FAMULUS_EXPORT_PYTHON,
or .venv-export in the repository. Without one the daemon tests skip, except under CI=true,
where they fail.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from famulus.daemon.extract import ExtractionError
from famulus.daemon.extract.image import decode_image, is_image
from famulus.daemon.extract.sandbox import ExtractionSandbox
from famulus.daemon.model.registry import register
from famulus.ipc.protocol import Event

from .conftest import DaemonHome, processes_with_home, wait_for_none

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 10 * 1024 * 1024


# -- image files -------------------------------------------------------------------------------

def image_bytes(fmt: str, size: tuple[int, int] = (120, 80), mode: str = "RGB",
                color: tuple[int, ...] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """Return a PNG that declares `width` x `height` RGB pixels but contains no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def png_of_zeros(width: int, height: int) -> bytes:
    """Return a valid all-black RGB PNG, compressed row by row to keep memory use small."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)  # filter byte, then the samples
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# -- decoding, without a model -----------------------------------------------------------------

def test_is_image_by_suffix() -> None:
    assert is_image(Path("a.png"))
    assert is_image(Path("b.JPG"))
    assert is_image(Path("c.jpeg"))
    assert is_image(Path("d.webp"))
    assert not is_image(Path("e.gif"))
    assert not is_image(Path("f.txt"))


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_decode_scales_longer_side(tmp_path: Path, fmt: str, suffix: str) -> None:
    path = write(tmp_path, f"wide.{suffix}", image_bytes(fmt, size=(2000, 1000)))
    image = decode_image(path, max_bytes=MAX_BYTES, max_side_px=896, max_pixels=10**8)
    assert (image.width, image.height) == (896, 448)
    assert (image.source_width, image.source_height) == (2000, 1000)
    assert len(image.pixels) == 896 * 448 * 3


def test_decode_keeps_small_image_size(tmp_path: Path) -> None:
    path = write(tmp_path, "small.png", image_bytes("PNG", size=(40, 30)))
    image = decode_image(path, max_bytes=MAX_BYTES, max_side_px=896, max_pixels=10**8)
    assert (image.width, image.height) == (40, 30)
    assert image.pixels[:3] == bytes((200, 30, 30))


def test_decode_transparent_becomes_white(tmp_path: Path) -> None:
    path = write(tmp_path, "clear.png", image_bytes("PNG", size=(4, 4), mode="RGBA",
                                                     color=(0, 0, 0, 0)))
    image = decode_image(path, max_bytes=MAX_BYTES, max_side_px=896, max_pixels=10**8)
    assert image.pixels == b"\xff" * (4 * 4 * 3)


def test_decode_applies_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    Image.new("RGB", (60, 20), (0, 0, 255)).save(buffer, format="JPEG", exif=exif)
    path = write(tmp_path, "rotated.jpg", buffer.getvalue())
    image = decode_image(path, max_bytes=MAX_BYTES, max_side_px=896, max_pixels=10**8)
    assert (image.width, image.height) == (20, 60)


@pytest.mark.parametrize("name, data", [
    ("random.png", os.urandom(2048)),
    ("truncated.png", image_bytes("PNG", size=(300, 300))[:400]),
    ("text.jpg", b"this is plain text, not a JPEG\n" * 10),
    ("gif.png", image_bytes("GIF")),
    ("empty-header.webp", b"RIFF\x00\x00\x00\x00WEBPVP8 "),
])
def test_decode_rejects_broken_as_corrupt(tmp_path: Path, name: str, data: bytes) -> None:
    path = write(tmp_path, name, data)
    with pytest.raises(ExtractionError) as caught:
        decode_image(path, max_bytes=MAX_BYTES, max_side_px=896, max_pixels=10**8)
    assert caught.value.reason == "corrupt"
    assert str(path) in str(caught.value)


def test_decode_rejects_pixel_bomb_header(tmp_path: Path) -> None:
    path = write(tmp_path, "bomb.png", png_header_only(60_000, 60_000))
    with pytest.raises(ExtractionError) as caught:
        decode_image(path, max_bytes=MAX_BYTES, max_side_px=896, max_pixels=50_000_000)
    assert caught.value.reason == "too_large"
    assert "model.vision_max_pixels" in str(caught.value)


def test_decode_rejects_large_file(tmp_path: Path) -> None:
    path = write(tmp_path, "big.png", image_bytes("PNG", size=(64, 64)))
    with pytest.raises(ExtractionError) as caught:
        decode_image(path, max_bytes=100, max_side_px=896, max_pixels=10**8)
    assert caught.value.reason == "too_large"


def test_sandbox_decodes_image(tmp_path: Path) -> None:
    path = write(tmp_path, "photo.webp", image_bytes("WEBP", size=(1000, 500)))
    sandbox = ExtractionSandbox(timeout_s=30, memory_bytes=1024**3)
    try:
        reply = sandbox.decode_image(path, max_bytes=MAX_BYTES, max_side_px=100,
                                     max_pixels=10**8)
    finally:
        sandbox.close()
    assert reply["shape"] == [50, 100, 3]
    assert reply["source_size"] == [1000, 500]
    assert reply["format"] == "webp"


def test_sandbox_memory_limit_stops_decode(tmp_path: Path) -> None:
    # 12000 x 12000 pixels need about 576 MB decoded (Pillow stores RGB in 4 bytes), far
    # over the child's 256 MiB address-space limit, from a PNG file of about 400 kB.
    path = write(tmp_path, "inflates.png", png_of_zeros(12_000, 12_000))
    sandbox = ExtractionSandbox(timeout_s=60, memory_bytes=256 * 1024 * 1024)
    try:
        with pytest.raises(ExtractionError) as caught:
            sandbox.decode_image(path, max_bytes=MAX_BYTES, max_side_px=896,
                                 max_pixels=10**9)
        assert caught.value.reason == "memory"
        # The next image gets a fresh child and decodes.
        small = write(tmp_path, "small.png", image_bytes("PNG", size=(10, 10)))
        reply = sandbox.decode_image(small, max_bytes=MAX_BYTES, max_side_px=896,
                                     max_pixels=10**9)
        assert reply["shape"] == [10, 10, 3]
    finally:
        sandbox.close()


# -- a real daemon with the tiny LLaVA ---------------------------------------------------------

def export_python() -> Path | None:
    named = os.environ.get("FAMULUS_EXPORT_PYTHON")
    if named:
        return Path(named)
    local = ROOT / ".venv-export" / "bin" / "python"
    return local if local.exists() else None


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build and export the tiny random LLaVA once per session; return its IR folder."""
    python = export_python()
    if python is None or not python.exists():
        reason = ("no interpreter with the export extra: set FAMULUS_EXPORT_PYTHON or create "
                  ".venv-export (see .ci/setup)")
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("tiny-llava")
    done = subprocess.run([str(python), str(ROOT / "tests" / "tiny_llava.py"), str(root)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"tiny LLaVA export failed:\n{done.stderr[-4000:]}"
    return root / "ov"


@pytest.fixture
def vision_home(tmp_path: Path, model_path: Path) -> Iterator[DaemonHome]:
    home = DaemonHome(tmp_path, model_path)
    home.inbox.mkdir()
    yield home
    home.stop()
    leftovers = wait_for_none(lambda: processes_with_home(tmp_path), 10)
    for pid in leftovers:
        os.kill(pid, 9)
    assert not leftovers, f"processes left behind by the daemon: {leftovers}"


def vision_config(llava: Path) -> str:
    return f"vision_path = {str(llava)!r}\ndevices = [\"CPU\"]\n"


def outcome_for(home: DaemonHome, path: Path, timeout: float = 120) -> Event:
    assert home.log is not None
    topics = ("document.summarized", "document.failed", "document.skipped")
    return home.log.wait(lambda e: e.topic in topics and e.body.get("path") == str(path),
                         timeout, f"an outcome for {path.name}")


def test_images_described_by_vision_model(vision_home: DaemonHome, llava_dir: Path) -> None:
    # By registered name, as `famulus model import` leaves it; the other tests use a path.
    models_dir = vision_home.root / "data" / "famulus" / "models"
    register(models_dir, "tiny-llava", {"path": str(llava_dir), "format": "openvino",
                                        "kind": "vlm"})
    vision_home.write_config(extra='vision = "tiny-llava"\ndevices = ["CPU"]\n')
    vision_home.start()
    paths = [write(vision_home.inbox, "red.png", image_bytes("PNG")),
             write(vision_home.inbox, "photo.jpg", image_bytes("JPEG", size=(1600, 1200))),
             write(vision_home.inbox, "web.webp", image_bytes("WEBP", color=(10, 200, 10)))]

    for path in paths:
        event = outcome_for(vision_home, path)
        assert event.topic == "document.summarized", event.body
        assert event.body["kind"] == "image"
        assert event.body["summary"].strip()
        assert event.body["model"] == "tiny-llava"
        assert event.body["device"] == "CPU"
        assert event.body["grounding"] == "not_applicable"
        assert event.body["grounded"] is None
        assert event.body["unsupported"] == []

    assert vision_home.log is not None
    loaded = vision_home.log.matching("model.loaded", kind="vlm")
    assert len(loaded) == 1, "the vision model host should load once, on the first image"
    rows = vision_home.rows("SELECT state, format FROM documents ORDER BY id")
    assert [(r["state"], r["format"]) for r in rows] == [("summarized", "image")] * 3
    summaries = vision_home.rows("SELECT model, grounding FROM summaries")
    assert {(r["model"], r["grounding"]) for r in summaries} == {
        ("tiny-llava", "not_applicable")}


def test_image_without_vision_model_skipped(vision_home: DaemonHome, llava_dir: Path) -> None:
    vision_home.start()
    path = write(vision_home.inbox, "waiting.png", image_bytes("PNG"))

    event = outcome_for(vision_home, path)
    assert event.topic == "document.skipped"
    assert event.body["reason_code"] == "no_vision_model"
    assert "no vision model configured" in event.body["reason"]
    assert "model.vision" in event.body["reason"]
    row = vision_home.rows("SELECT state, reason_code FROM documents WHERE path = ?",
                           (str(path),))[0]
    assert (row["state"], row["reason_code"]) == ("skipped", "no_vision_model")

    # Configuring a vision model and restarting describes the image that waited.
    vision_home.stop()
    vision_home.write_config(extra=vision_config(llava_dir))
    vision_home.start()
    assert vision_home.log is not None
    described = vision_home.log.wait(
        lambda e: e.topic == "document.summarized" and e.body["path"] == str(path), 120,
        "the skipped image to be described after the restart")
    assert described.body["kind"] == "image"
    assert described.body["summary"].strip()


def test_unregistered_vision_model_fails_image(vision_home: DaemonHome) -> None:
    vision_home.write_config(extra='vision = "no-such-model"\n')
    vision_home.start()
    path = write(vision_home.inbox, "photo.png", image_bytes("PNG"))

    event = outcome_for(vision_home, path)
    assert event.topic == "document.failed"
    assert event.body["reason_code"] == "model_error"
    assert "'no-such-model'" in event.body["reason"]
    assert "model.vision_path" in event.body["reason"]
    assert "famulus model import" in event.body["reason"]


def test_broken_images_recorded_next_works(vision_home: DaemonHome, llava_dir: Path) -> None:
    vision_home.write_config(extra=vision_config(llava_dir))
    vision_home.start()
    broken = {
        "corrupt.png": (os.urandom(4096), "corrupt"),
        "truncated.jpg": (image_bytes("JPEG", size=(400, 300))[:300], "corrupt"),
        "bomb.png": (png_header_only(60_000, 60_000), "too_large"),
    }
    for name, (data, reason_code) in broken.items():
        path = write(vision_home.inbox, name, data)
        event = outcome_for(vision_home, path)
        assert event.topic == "document.failed", (name, event.body)
        assert event.body["reason_code"] == reason_code, (name, event.body)
        assert name in event.body["reason"]

    good = write(vision_home.inbox, "after.png", image_bytes("PNG"))
    event = outcome_for(vision_home, good)
    assert event.topic == "document.summarized"
    assert event.body["summary"].strip()
    assert vision_home.proc is not None and vision_home.proc.poll() is None


def test_cancel_image_job(vision_home: DaemonHome, llava_dir: Path) -> None:
    # The tiny LLaVA never ends a reply by itself (see tiny_llava.py), so these 4000 tokens
    # take seconds unless the generation is cancelled. The model has 4096 positions.
    vision_home.write_config(max_new_tokens=4000, extra=vision_config(llava_dir))
    vision_home.start()
    path = write(vision_home.inbox, "long.png", image_bytes("PNG"))
    log = vision_home.log
    assert log is not None
    detected = log.wait(lambda e: e.topic == "document.detected" and e.body["path"] == str(path),
                        30, "the image to be detected")
    queued = log.wait(lambda e: e.topic == "job.queued"
                      and e.body["document"] == detected.body["document"], 10, "its job")
    job = queued.body["job"]
    log.wait(lambda e: e.topic == "model.loaded" and e.body.get("kind") == "vlm", 60,
             "the vision model to load")

    with vision_home.client() as client:
        assert client.call("cancel", {"id": job}) == {"job": job, "state": "cancelling"}
        sent = time.monotonic()
    log.wait(lambda e: e.topic == "job.cancelled" and e.body["job"] == job, 10,
             "the image job to be cancelled")
    assert time.monotonic() - sent < 2.0
    row = vision_home.rows("SELECT state, reason_code FROM documents WHERE path = ?",
                           (str(path),))[0]
    assert (row["state"], row["reason_code"]) == ("skipped", "cancelled")
