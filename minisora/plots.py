"""Small line charts written as PNG with PIL (matplotlib is not a dependency).

`line_panels_png` draws one panel per metric, one line per method, against an integer x (for
`minisora eval`: the generated-frame index). Deterministic: the same numbers give the same bytes.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
PANEL_W, PANEL_H, MARGIN = 420, 300, 48


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int], title: str, series: dict[str, list[float]],
           x0: int, font) -> None:
    ox, oy = box
    left, top, right, bottom = ox + MARGIN, oy + 28, ox + PANEL_W - 12, oy + PANEL_H - 36
    values = [v for ys in series.values() for v in ys]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    n = max(len(ys) for ys in series.values())

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(n - 1, 1))
        return x, bottom - (bottom - top) * (v - lo) / (hi - lo)

    draw.text((ox + MARGIN, oy + 8), title, fill=(0, 0, 0), font=font)
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    for k in range(5):  # y ticks
        v = lo + (hi - lo) * k / 4
        y = xy(0, v)[1]
        draw.line((left - 4, y, left, y), fill=(0, 0, 0))
        draw.text((ox + 2, y - 6), f"{v:.3g}", fill=(0, 0, 0), font=font)
    for i in range(n):  # x ticks: the generated-frame index, counted from x0
        x = xy(i, lo)[0]
        draw.line((x, bottom, x, bottom + 4), fill=(0, 0, 0))
        if n <= 16 or i % max(1, n // 8) == 0:
            draw.text((x - 4, bottom + 6), str(i + x0), fill=(0, 0, 0), font=font)
    draw.text((left + (right - left) // 2 - 60, bottom + 20), "generated frame index", fill=(0, 0, 0), font=font)
    for c, (name, ys) in enumerate(series.items()):
        colour = COLOURS[c % len(COLOURS)]
        pts = [xy(i, v) for i, v in enumerate(ys)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)


def line_panels_png(path: str | Path, panels: dict[str, dict[str, list[float]]], x0: int = 1) -> Path:
    """Write one panel per entry of `panels` ({title: {method: [y per x]}}) side by side, with a legend
    of the methods below; returns the path. Every series needs at least one value."""
    if not panels or any(not s or any(len(ys) == 0 for ys in s.values()) for s in panels.values()):
        raise ValueError(f"line_panels_png needs at least one non-empty series per panel, got {panels!r}")
    font = ImageFont.load_default()
    methods = list(next(iter(panels.values())))
    legend_h = 18 * len(methods) + 8
    img = Image.new("RGB", (PANEL_W * len(panels), PANEL_H + legend_h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for p, (title, series) in enumerate(panels.items()):
        _panel(draw, (p * PANEL_W, 0), title, series, x0, font)
    for c, name in enumerate(methods):
        y = PANEL_H + 4 + 18 * c
        draw.rectangle((MARGIN, y + 3, MARGIN + 20, y + 9), fill=COLOURS[c % len(COLOURS)])
        draw.text((MARGIN + 28, y), name, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path
