"""Tray icons drawn with Pillow: one fill colour and one white mark per state.

Each state has its own colour, so the state can be read from the icon's pixels alone, as the
tray test does. The white mark keeps states apart for colour-blind users.
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw, ImageFont

from famulus.daemon.tray.state import TrayState

SIZE = 64
WHITE = (255, 255, 255, 255)

# RGB fill per state; the tray test looks for these values in screenshots.
COLOURS: dict[TrayState, tuple[int, int, int]] = {
    TrayState.IDLE: (40, 160, 70),
    TrayState.WORKING: (30, 100, 230),
    TrayState.PAUSED: (235, 160, 0),
    TrayState.LOADING: (140, 80, 220),
    TrayState.NO_MODEL: (130, 130, 130),
    TrayState.ERROR: (215, 30, 30),
    TrayState.NOT_RUNNING: (50, 50, 50),
}


def draw_icon(state: TrayState, queue_depth: int = 0) -> Image.Image:
    """Draw the icon for `state`; the working icon shows `queue_depth` (9+ above nine)."""
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((2, 2, SIZE - 3, SIZE - 3), fill=(*COLOURS[state], 255))
    if state == TrayState.WORKING:
        _text(draw, str(queue_depth) if queue_depth <= 9 else "9+")
    elif state == TrayState.PAUSED:
        draw.rectangle((22, 18, 28, 46), fill=WHITE)
        draw.rectangle((36, 18, 42, 46), fill=WHITE)
    elif state == TrayState.LOADING:
        draw.arc((16, 16, 47, 47), start=0, end=270, fill=WHITE, width=6)
    elif state == TrayState.NO_MODEL:
        _text(draw, "?")
    elif state == TrayState.ERROR:
        _text(draw, "!")
    elif state == TrayState.NOT_RUNNING:
        draw.line((20, 20, 43, 43), fill=WHITE, width=6)
        draw.line((20, 43, 43, 20), fill=WHITE, width=6)
    else:
        draw.line((18, 33, 28, 43), fill=WHITE, width=6)
        draw.line((28, 43, 46, 22), fill=WHITE, width=6)
    return image


def _text(draw: ImageDraw.ImageDraw, text: str) -> None:
    font: Any = ImageFont.load_default(size=34)
    draw.text((SIZE / 2, SIZE / 2), text, fill=WHITE, font=font, anchor="mm")
