"""A small time-series chart drawn server-side as SVG: no chart library, no CDN."""

from __future__ import annotations

from collections.abc import Sequence
from xml.sax.saxutils import escape

WIDTH, HEIGHT, PAD = 600, 160, 34


def _nice(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def line_chart(
    points: Sequence[tuple[float, float | None]], *, title: str, unit: str, span_s: float = 900.0
) -> str:
    """`points` are (unix time, value or None); the x axis is the last `span_s` seconds."""
    known = [(t, v) for t, v in points if v is not None]
    end = max((t for t, _ in points), default=0.0)
    start = end - span_s
    top = max([v for _, v in known] + [1.0]) * 1.1
    inner_w, inner_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD

    def x(t: float) -> float:
        return PAD + max(0.0, (t - start) / span_s) * inner_w

    def y(v: float) -> float:
        return PAD + inner_h - (v / top) * inner_h

    path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in known if t >= start)
    latest = f"{_nice(known[-1][1])} {unit}" if known else "no data yet"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(title)}">',
        '<rect width="100%" height="100%" fill="#fff"/>',
        f'<text x="{PAD}" y="20" font-family="sans-serif" font-size="13" fill="#222">'
        f"{escape(title)}: {escape(latest)}</text>",
        f'<line x1="{PAD}" y1="{PAD + inner_h}" x2="{PAD + inner_w}" y2="{PAD + inner_h}" stroke="#999"/>',
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{PAD + inner_h}" stroke="#999"/>',
        f'<text x="{PAD - 4}" y="{PAD + 4}" font-family="sans-serif" font-size="10" text-anchor="end" '
        f'fill="#555">{_nice(top)}</text>',
        f'<text x="{PAD - 4}" y="{PAD + inner_h}" font-family="sans-serif" font-size="10" '
        f'text-anchor="end" fill="#555">0</text>',
        f'<text x="{PAD}" y="{HEIGHT - 8}" font-family="sans-serif" font-size="10" fill="#555">'
        f"-{span_s / 60:.0f} min</text>",
        f'<text x="{PAD + inner_w}" y="{HEIGHT - 8}" font-family="sans-serif" font-size="10" '
        'text-anchor="end" fill="#555">now</text>',
    ]
    if path:
        parts.append(f'<polyline fill="none" stroke="#1f6feb" stroke-width="2" points="{path}"/>')
    parts.append("</svg>")
    return "".join(parts)
