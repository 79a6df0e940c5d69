"""Geometry of a time-series chart (requests as bars, tokens as a line, each on its own axis) for an
inline SVG drawn by a template: no JavaScript charting library and no build step, as with the loss
curve (loss_chart.py, whose tick rounding this reuses). Pure functions of the buckets, so they test alone.
"""

from dataclasses import dataclass, field
from datetime import datetime

from frontend.loss_chart import _nice_step

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 64, 14, 40


@dataclass(frozen=True)
class Bucket:
    start: datetime
    requests: int
    tokens: int


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str


@dataclass(frozen=True)
class TimeChart:
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    right: int = WIDTH - RIGHT
    bottom: int = HEIGHT - BOTTOM
    bars: list[Bar] = field(default_factory=list)
    line: str = ""  # "x,y x,y ..." of the tokens line
    x_ticks: list[tuple[float, str]] = field(default_factory=list)
    requests_ticks: list[tuple[float, str]] = field(default_factory=list)  # left axis
    tokens_ticks: list[tuple[float, str]] = field(default_factory=list)  # right axis
    total_requests: int = 0
    total_tokens: int = 0

    @property
    def empty(self) -> bool:
        return not self.total_requests and not self.total_tokens


def short(value: float) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}".removesuffix(".0") + suffix
    return f"{value:.0f}"


def _axis(top_value: float) -> tuple[float, float]:
    """A round maximum for an axis and its tick step (about four ticks)."""
    if top_value <= 0:
        return 4.0, 1.0
    step = max(_nice_step(top_value, 4), 1.0)
    return step * -(-top_value // step), step


def time_chart(buckets: list[Bucket], *, label_format: str = "%H:%M", label_every: int = 1) -> TimeChart:
    """Bars of requests and a line of tokens per bucket (oldest first); every `label_every`-th bucket
    gets a label on the time axis."""
    chart = TimeChart()
    if not buckets:
        return chart
    inner_w, inner_h = chart.right - chart.left, chart.bottom - chart.top
    slot = inner_w / len(buckets)
    req_top, req_step = _axis(max(b.requests for b in buckets))
    tok_top, tok_step = _axis(max(b.tokens for b in buckets))
    bars, points, x_ticks = [], [], []
    for i, bucket in enumerate(buckets):
        x = chart.left + i * slot
        height = inner_h * bucket.requests / req_top
        when = bucket.start.strftime(label_format)
        bars.append(Bar(x=round(x + slot * 0.15, 1), y=round(chart.bottom - height, 1), width=round(slot * 0.7, 1),
                        height=round(height, 1), title=f"{when}: {bucket.requests} requests, {bucket.tokens} tokens"))
        points.append(f"{round(x + slot / 2, 1)},{round(chart.bottom - inner_h * bucket.tokens / tok_top, 1)}")
        if i % label_every == 0:
            x_ticks.append((round(x + slot / 2, 1), when))
    requests_ticks = [(round(chart.bottom - inner_h * k * req_step / req_top, 1), short(k * req_step))
                      for k in range(int(req_top / req_step) + 1)]
    tokens_ticks = [(round(chart.bottom - inner_h * k * tok_step / tok_top, 1), short(k * tok_step))
                    for k in range(int(tok_top / tok_step) + 1)]
    return TimeChart(bars=bars, line=" ".join(points), x_ticks=x_ticks, requests_ticks=requests_ticks,
                     tokens_ticks=tokens_ticks, total_requests=sum(b.requests for b in buckets),
                     total_tokens=sum(b.tokens for b in buckets))
