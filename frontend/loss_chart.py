"""Geometry of a job's loss curve, for an inline SVG the template draws.

The console has no JavaScript charting library (no CDN, no build step): the server turns the
job's metrics events into polyline coordinates and axis ticks, and htmx swaps in a fresh SVG
every couple of seconds while the job runs. Pure functions of the points, so they test alone.
"""

import math
from dataclasses import dataclass, field

WIDTH, HEIGHT = 640, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 14, 34  # margins for the axis labels


@dataclass(frozen=True)
class Series:
    name: str
    points: str  # "x,y x,y ..." in SVG units, for <polyline points=...>
    last: tuple[float, float] | None  # the newest point, marked with a dot
    count: int


@dataclass(frozen=True)
class LossChart:
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    right: int = WIDTH - RIGHT
    bottom: int = HEIGHT - BOTTOM
    series: list[Series] = field(default_factory=list)
    x_ticks: list[tuple[float, str]] = field(default_factory=list)
    y_ticks: list[tuple[float, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not any(s.count for s in self.series)


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _nice_step(span: float, count: int) -> float:
    """A round tick spacing (1, 2 or 5 times a power of ten) giving about `count` ticks over `span`."""
    raw = span / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def _label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:.{decimals}f}"


def loss_chart(points: list[dict]) -> LossChart:
    """Training and validation loss against step, from selectors.job_loss_curve's points."""
    train = [(p["step"], p["train_loss"]) for p in points if _finite(p.get("step")) and _finite(p.get("train_loss"))]
    valid = [(p["step"], p["valid_loss"]) for p in points if _finite(p.get("step")) and _finite(p.get("valid_loss"))]
    every = train + valid
    if not every:
        return LossChart(series=[Series("train", "", None, 0), Series("validation", "", None, 0)])
    x_low, x_high = 0.0, float(max(s for s, _ in every))
    x_high = max(x_high, 1.0)
    y_low, y_high = min(v for _, v in every), max(v for _, v in every)
    if y_high - y_low < 1e-9:  # a flat line still needs a visible range
        y_low, y_high = y_low - 0.5, y_high + 0.5
    y_step = _nice_step(y_high - y_low, 4)
    y_low = math.floor(y_low / y_step) * y_step
    y_high = math.ceil(y_high / y_step) * y_step
    chart = LossChart()
    inner_w, inner_h = chart.right - chart.left, chart.bottom - chart.top

    def x_of(step: float) -> float:
        return round(chart.left + (step - x_low) / (x_high - x_low) * inner_w, 1)

    def y_of(loss: float) -> float:
        return round(chart.bottom - (loss - y_low) / (y_high - y_low) * inner_h, 1)

    def series(name: str, values: list[tuple[float, float]]) -> Series:
        values = sorted(values, key=lambda p: p[0])
        coords = [(x_of(s), y_of(v)) for s, v in values]
        return Series(name, " ".join(f"{x},{y}" for x, y in coords), coords[-1] if coords else None, len(coords))

    x_step = _nice_step(x_high - x_low, 6)
    x_step = max(x_step, 1.0)
    x_ticks = [(x_of(s), str(int(s))) for s in _range(x_low, x_high, x_step)]
    y_ticks = [(y_of(v), _label(v, y_step)) for v in _range(y_low, y_high, y_step)]
    return LossChart(series=[series("train", train), series("validation", valid)], x_ticks=x_ticks, y_ticks=y_ticks)


def _range(low: float, high: float, step: float) -> list[float]:
    values, n = [], 0
    while low + n * step <= high + step * 1e-6 and n < 100:
        values.append(low + n * step)
        n += 1
    return values
