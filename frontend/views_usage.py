"""Console pages for usage: totals per team, key, model, day or kind over a window, drawn as a
server-rendered SVG bar chart (no charting library, no build step), a table, and the CSV export.

Reads only, through citadel.usage.selectors, scoped to the user's teams by
citadel.accounts.permissions (platform administrators see every team).
"""

from dataclasses import dataclass

from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import render

from citadel.core.exceptions import InvalidRequest
from citadel.usage import selectors
from citadel.usage.export import usage_csv
from citadel.usage.services import usage_meter_fine_tuning

WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 720, 240, 64, 56, 12
GROUPINGS = [("team", "Team"), ("key", "API key"), ("model", "Model"), ("day", "Day"), ("kind", "Kind")]
METRICS = [("tokens", "Tokens"), ("gpu_seconds", "Fine-tuning GPU-seconds"), ("requests", "Requests")]


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    value: str
    prompt_height: float  # the prompt tokens' part of a tokens bar, drawn darker at its foot

    @property
    def prompt_y(self) -> float:
        return self.y + self.height - self.prompt_height


@dataclass(frozen=True)
class BarChart:
    bars: list[Bar]
    ticks: list[tuple[float, str]]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM


def _value(row, metric: str) -> float:
    return {"tokens": row.total_tokens, "gpu_seconds": row.gpu_seconds, "requests": row.requests}[metric]


def _fmt(value: float) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}{suffix}"
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


def bar_chart(rows, metric: str, limit: int = 24) -> BarChart:
    """Bars for the first `limit` rows, scaled to the largest, with four round ticks."""
    rows = list(rows)[:limit]
    top = max((_value(row, metric) for row in rows), default=0) or 1
    span = (WIDTH - LEFT - 8) / max(len(rows), 1)
    plot = HEIGHT - BOTTOM - TOP
    bars = []
    for i, row in enumerate(rows):
        value = _value(row, metric)
        height = plot * value / top
        prompt = plot * row.prompt_tokens / top if metric == "tokens" else 0.0
        bars.append(Bar(x=round(LEFT + i * span + span * 0.15, 1), y=round(HEIGHT - BOTTOM - height, 1),
                        width=round(span * 0.7, 1), height=round(height, 1), label=row.group[:18], value=_fmt(value),
                        prompt_height=round(prompt, 1)))
    ticks = [(round(HEIGHT - BOTTOM - plot * k / 4, 1), _fmt(top * k / 4)) for k in range(5)]
    return BarChart(bars=bars, ticks=ticks)


def _query(request) -> dict:
    params = request.GET
    by = params.get("by") or "team"
    metric = params.get("metric") or "tokens"
    if by not in dict(GROUPINGS) or metric not in dict(METRICS):
        raise InvalidRequest("Unknown grouping or measure.")
    return {"days": params.get("days") or "30", "by": by, "metric": metric, "team": params.get("team") or "",
            "model": params.get("model") or ""}


def _records(request, query: dict):
    usage_meter_fine_tuning()  # ended fine-tuning jobs that beat has not metered yet
    return selectors.usage_filter(selectors.usage_visible(user=request.user),
                                  since=selectors.usage_window(days=query["days"]), team=query["team"],
                                  model=query["model"])


@login_required
def usage_page(request):
    try:
        query = _query(request)
        records = _records(request, query)
    except InvalidRequest as error:
        return render(request, "frontend/usage/usage.html", {"error": error.message, "groupings": GROUPINGS,
                                                              "metrics": METRICS, "query": {}}, status=400)
    rows = selectors.usage_totals(records, by=query["by"])
    if query["metric"] != "tokens" and query["by"] != "day":
        rows.sort(key=lambda row: -_value(row, query["metric"]))
    daily = selectors.usage_totals(records, by="day")
    return render(request, "frontend/usage/usage.html", {
        "query": query, "groupings": GROUPINGS, "metrics": METRICS, "rows": rows,
        "total": selectors.usage_sum(records), "chart": bar_chart(rows, query["metric"]),
        "daily": bar_chart(daily, "tokens", limit=62), "export": request.GET.urlencode()})


@login_required
def usage_export(request):
    try:
        records = _records(request, _query(request))
    except InvalidRequest as error:
        return HttpResponse(f"{error.message}\n", status=400, content_type="text/plain")
    response = HttpResponse(usage_csv(records), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="citadel-usage.csv"'
    return response
