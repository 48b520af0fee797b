"""A small toolkit for self-contained HTML reports: page shell, banner, tables, embedded figures.

Every report avprune writes (``avprune validate``'s, the prune job's) is one HTML file with no
scripts and no external files, so it can be attached to a CI run or mailed: charts are
matplotlib PNGs and pictures JPEGs, embedded as base64 ``data:`` URIs. Text is escaped here, once:
callers pass plain values, or :class:`Raw` for markup they built with these helpers.

    from deploy import html_kit as hk
    fig, ax = hk.figure(8, 3)
    ax.plot(...)
    page = hk.page("My report", [hk.banner("PASS: within budget", passed=True),
                                 hk.section("Numbers", hk.table(["model", "p50 ms"], [["dense", 7.1]])),
                                 hk.section("Chart", hk.png(hk.figure_png(fig), "latency", ident="latency"))])
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:16px 0 6px}
.verdict{padding:12px 16px;border-radius:6px;font-size:18px;font-weight:600;margin:12px 0}
.pass{background:#e3f6e5;color:#14601f;border:1px solid #7bc98a} .fail{background:#fde6e6;color:#8a1212;border:1px solid #e08a8a}
.info{background:#eef3fb;color:#1c3d6e;border:1px solid #9db5de}
table{border-collapse:collapse;font-size:13px;margin:8px 0} th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left} tr.overall td{font-weight:600;background:#fafafa}
.tag-pass{color:#14601f;font-weight:700} .tag-fail{color:#a11;font-weight:700}
img.chart{max-width:100%;border:1px solid #eee;margin:6px 0} .samples{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0} figcaption{font-size:12px;color:#555} .pair{display:flex;gap:6px}
.muted{color:#666;font-size:13px} code{background:#f4f4f4;padding:1px 4px;border-radius:3px}
.note{background:#fff8e1;border:1px solid #f0d48a;padding:8px 12px;border-radius:4px;margin:8px 0;font-size:13px}
"""


class Raw(str):
    """Markup that is already HTML (from these helpers): inserted as is, never escaped again."""


def esc(x: Any) -> str:
    """``x`` as HTML text (``Raw`` passes through)."""
    return x if isinstance(x, Raw) else html.escape(str(x))


def fmt(x: Any, digits: int = 2) -> str:
    """Numbers for tables: floats to ``digits`` places, None as an en dash."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return "–" if np.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def page(title: str, body: Iterable[str], *, heading: str | None = None, css: str = "") -> str:
    """The whole document: ``<h1>`` (``heading``, default ``title``) then the body parts in order."""
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{CSS}{css}</style></head><body>",
        f"<h1>{esc(heading if heading is not None else title)}</h1>",
        *body,
        "</body></html>",
    ])


def section(title: str, *parts: str) -> Raw:
    """An ``<h2>`` heading followed by its parts."""
    return Raw("\n".join([f"<h2>{esc(title)}</h2>", *parts]))


def paragraph(text: Any, *, cls: str = "muted") -> Raw:
    return Raw(f'<p class="{cls}">{esc(text)}</p>')


def note(text: Any) -> Raw:
    """A highlighted remark (e.g. "the two models differ in input size")."""
    return Raw(f'<div class="note">{esc(text)}</div>')


def banner(text: Any, *, passed: bool | None, reasons: Sequence[Any] = ()) -> Raw:
    """A verdict box: green (passed), red (failed) or blue (None: information), with reasons below."""
    cls = "info" if passed is None else ("pass" if passed else "fail")
    items = "".join(f"<li>{esc(r)}</li>" for r in reasons)
    return Raw(f'<div class="verdict {cls}">{esc(text)}</div>' + (f"<ul>{items}</ul>" if items else ""))


def tag(passed: bool) -> Raw:
    """An inline PASS / FAIL."""
    return Raw('<span class="tag-pass">PASS</span>' if passed else '<span class="tag-fail">FAIL</span>')


def table(
    header: Sequence[Any],
    rows: Iterable[Sequence[Any]],
    *,
    left: int = 1,
    row_classes: Sequence[str | None] | None = None,
    digits: int = 2,
) -> Raw:
    """A table; the first ``left`` columns are left-aligned (labels), the rest right-aligned (numbers).

    Cells go through :func:`fmt` then :func:`esc`, so pass plain values (or :class:`Raw`)."""
    def cell(i: int, v: Any, th: bool = False) -> str:
        t = "th" if th else "td"
        cls = " class='l'" if i < left else ""
        return f"<{t}{cls}>{v if isinstance(v, Raw) else esc(fmt(v, digits))}</{t}>"

    out = ["<table><tr>" + "".join(cell(i, h, th=True) for i, h in enumerate(header)) + "</tr>"]
    for k, row in enumerate(rows):
        cls = row_classes[k] if row_classes is not None and k < len(row_classes) else None
        attr = f" class='{esc(cls)}'" if cls else ""
        out.append(f"<tr{attr}>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>")
    out.append("</table>")
    return Raw("\n".join(out))


# ----------------------------------------------------------------------------- images and figures


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def png(data: bytes, alt: str, *, ident: str | None = None) -> Raw:
    """An embedded PNG chart."""
    id_attr = f' id="{esc(ident)}"' if ident else ""
    return Raw(f'<img class="chart"{id_attr} alt="{esc(alt)}" src="{data_uri(data, "image/png")}">')


def jpeg(rgb: np.ndarray, alt: str, *, width: int | None = None, quality: int = 85) -> Raw:
    """An embedded JPEG of an HxWx3 uint8 RGB picture."""
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"cannot encode a {rgb.shape} {rgb.dtype} picture as JPEG; pass HxWx3 uint8 RGB")
    w = f' width="{int(width)}"' if width else ""
    return Raw(f'<img src="{data_uri(buf.tobytes(), "image/jpeg")}" alt="{esc(alt)}"{w}>')


def figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Any, Any]:
    """A matplotlib Figure (no pyplot state, safe in threads and headless) and its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots(nrows, ncols)


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure rendered to PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
