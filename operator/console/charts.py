"""Line charts as inline SVG, rendered on the server: no chart library in the browser, so a page
updated over server-sent events is just HTML swapped in. Pure functions of the metric records."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Any

WIDTH, HEIGHT, PAD_L, PAD_R, PAD_T, PAD_B = 560, 220, 56, 12, 14, 30
COLORS = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#65a30d")
PANELS = (("loss", ("loss", "eval_loss")), ("learningRate", ("lr",)), ("tokensPerSecond", ("tokens_per_second",)))


@dataclass(frozen=True)
class Series:
    label: str
    points: list[tuple[float, float]]
    color: str
    dashed: bool = False


def series(records: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) of every record that has a finite `key` (events and other records skipped)."""
    out = []
    for record in records:
        value, step = record.get(key), record.get("step")
        if isinstance(value, int | float) and isinstance(step, int | float) and math.isfinite(value):
            out.append((float(step), float(value)))
    return out


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / count for i in range(count + 1)]


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.3g}"


def svg(title: str, lines: list[Series], empty: str = "no data yet") -> str:
    """One chart with axes, ticks and a legend; `title` doubles as the accessible name."""
    head = (f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>')
    points = [p for s in lines for p in s.points]
    if not points:
        return head + f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="muted">{escape(empty)}</text></svg>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0 or 1) * 0.1, y1 + abs(y1 or 1) * 0.1
    plot_w, plot_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B

    def px(x: float, y: float) -> str:
        return f"{PAD_L + (x - x0) / (x1 - x0) * plot_w:.1f},{PAD_T + (1 - (y - y0) / (y1 - y0)) * plot_h:.1f}"

    parts = [head]
    for y in _ticks(y0, y1):
        yy = px(x0, y).split(",")[1]
        parts.append(f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{yy}" y2="{yy}" class="grid"/>'
                     f'<text x="{PAD_L - 6}" y="{yy}" text-anchor="end" dominant-baseline="middle" class="tick">{_fmt(y)}</text>')
    for x in _ticks(x0, x1):
        xx = px(x, y0).split(",")[0]
        parts.append(f'<text x="{xx}" y="{HEIGHT - 10}" text-anchor="middle" class="tick">{_fmt(round(x))}</text>')
    for i, line in enumerate(lines):
        if not line.points:
            continue
        dash = ' stroke-dasharray="5 3"' if line.dashed else ""
        path = " ".join(px(x, y) for x, y in line.points)
        parts.append(f'<polyline fill="none" stroke="{line.color}" stroke-width="2"{dash} points="{path}" '
                     f'data-series="{escape(line.label)}" data-points="{len(line.points)}"/>')
        parts.append(f'<text x="{WIDTH - PAD_R - 4}" y="{PAD_T + 12 + 14 * i}" text-anchor="end" '
                     f'fill="{line.color}" class="legend">{escape(line.label)}</text>')
    return "".join(parts) + "</svg>"


def run_charts(records: list[dict[str, Any]], titles: dict[str, str]) -> list[str]:
    """The panels of a run's detail page: loss with eval loss, learning rate, tokens/s."""
    out = []
    for panel, keys in PANELS:
        lines = [Series(key, series(records, key), COLORS[i], dashed=key.startswith("eval")) for i, key in enumerate(keys)]
        out.append(svg(titles.get(panel, panel), lines, titles.get("noData", "no data yet")))
    return out


def compare_chart(runs: dict[str, list[dict[str, Any]]], key: str, title: str) -> str:
    """`key` of several runs overlaid, one colour per run."""
    lines = [Series(name, series(records, key), COLORS[i % len(COLORS)]) for i, (name, records) in enumerate(runs.items())]
    return svg(title, lines)
