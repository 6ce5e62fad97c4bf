"""Image decoding for the vision model: PNG, JPEG and WebP to scaled-down RGB pixels.

Runs inside the extraction child process (see `sandbox`), whose time and address-space
limits protect the daemon from images that take minutes or gigabytes to decode.
"""

from __future__ import annotations

import base64
import io
import pathlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import ExtractionError

if TYPE_CHECKING:
    from PIL.Image import Image as PilImage

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})

# Pillow format names accepted for the suffixes above. A file whose content is another
# format (a GIF renamed to .png) is rejected instead of being decoded by a parser that
# famulus does not mean to expose.
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP"})


def is_image(path: pathlib.Path) -> bool:
    """Tell whether the file name marks an image that the vision model describes."""
    return path.suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class DecodedImage:
    """RGB pixels of one image, scaled so that neither side exceeds the limit."""

    pixels: bytes
    """uint8 samples in height, width, channel order (HWC), 3 channels."""
    width: int
    height: int
    source_width: int
    source_height: int
    format: str

    def to_message(self) -> dict[str, object]:
        """Encode for a JSON line: the pixels as base64, the shape as [height, width, 3]."""
        return {"pixels": base64.b64encode(self.pixels).decode("ascii"),
                "shape": [self.height, self.width, 3]}


def decode_image(path: pathlib.Path, *, max_bytes: int, max_side_px: int,
                 max_pixels: int) -> DecodedImage:
    """Decode the image at `path` and scale it to at most `max_side_px` on its longer side.

    Raises:
        ExtractionError: `too_large` for files over `max_bytes` or images with more than
            `max_pixels` pixels (the header is checked before any pixel is decoded),
            `corrupt` for files that are not a valid PNG, JPEG or WebP image.
    """
    # Imported here: the daemon process itself never decodes images.
    from PIL import Image, ImageOps, UnidentifiedImageError

    from . import _read_bounded

    data = _read_bounded(path, max_bytes)
    # The pixel-count check below replaces Pillow's global limit, so that the limit is
    # the configured one and the error carries famulus's reason code.
    Image.MAX_IMAGE_PIXELS = None
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ExtractionError("corrupt", f"{path} is not a readable PNG, JPEG or WebP image; "
                              "check that the file is complete") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Some plugins (WebP) start decoding in open() and raise these for malformed data.
        raise ExtractionError("corrupt", f"reading the image header of {path} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    with image:
        if image.format not in ACCEPTED_FORMATS:
            raise ExtractionError(
                "corrupt", f"{path} contains a {image.format} image, not the PNG, JPEG or "
                "WebP its name says; convert it to one of those formats")
        width, height = image.size
        if width < 1 or height < 1:
            raise ExtractionError("corrupt", f"{path} declares an empty image ({width}x{height})")
        if width * height > max_pixels:
            raise ExtractionError(
                "too_large", f"{path} is {width}x{height} = {width * height:,} pixels, over the "
                f"limit of {max_pixels:,}; raise model.vision_max_pixels in the famulus config "
                "to describe it")
        try:
            # JPEG can decode at 1/2, 1/4 or 1/8 scale directly, which saves most of the work.
            image.draft("RGB", (max_side_px, max_side_px))
            image.load()
            upright = ImageOps.exif_transpose(image)
            upright.thumbnail((max_side_px, max_side_px), Image.Resampling.LANCZOS)
            rgb = _flatten_to_rgb(upright)
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            # Pillow raises these for truncated or malformed image data.
            raise ExtractionError("corrupt", f"decoding the image {path} failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
        return DecodedImage(pixels=rgb.tobytes(), width=rgb.width, height=rgb.height,
                            source_width=width, source_height=height,
                            format=str(image.format).lower())


def _flatten_to_rgb(image: PilImage) -> PilImage:
    """Convert to RGB; transparent areas become white, as most viewers show them."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
