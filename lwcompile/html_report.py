"""The report as one self-contained HTML page: inline CSS and SVG, no script, no network.

The page can be mailed, attached to a CI run or opened years later: the per-layer cost chart
is drawn as inline SVG, and output crops are PNGs inlined as base64 data.

    write_html(light.lwcompile_report.to_dict(), "report.html",
               crops=[("teacher", to_png(teacher_out)), ("student", to_png(student_out))])
"""

from __future__ import annotations

import base64
import html
import os
import struct
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import arguments as check
from .files import write_atomic
from .report import APPLIED, KEPT, REFUSED, short_number

Crops = Mapping[str, bytes] | Sequence[tuple[str, bytes]]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;
 background:#f6f7f9;margin:0 auto;padding:24px 32px;max-width:1120px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}
.meta{color:#667;margin:0 0 18px}
.cards{display:grid;grid-template-columns:repeat(4,1fr);gap:12px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:12px 14px}
.card .k{color:#667;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:18px;font-weight:600;margin-top:2px}.card .r{color:#0a7f4f;font-weight:600}
.card .r.up{color:#a15c00}
.chip{display:inline-block;border-radius:12px;padding:2px 10px;margin:0 6px 6px 0;
 background:#e4edff;color:#1f4fb8;font-weight:600}.chip.guard{background:#fdf0dc;color:#8a5300}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde1e8}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eceef2;vertical-align:top}
th{background:#f0f2f5;font-weight:600}td.n,td.l{text-align:right;white-space:nowrap}
td.l{text-align:left}
code{font:12px ui-monospace,Menlo,Consolas,monospace}
.o{border-radius:4px;padding:1px 6px;font-size:12px;font-weight:600;white-space:nowrap}
.o-kept{background:#fdf0dc;color:#8a5300}.o-refused{background:#ffe3e3;color:#a11}
.o-rolled{background:#f3e3ff;color:#6b1fa1}
.chart{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:8px}
.chart svg{display:block;width:100%;height:auto;margin-top:6px}
.legend span{display:inline-block;width:12px;height:12px;border-radius:2px;margin:0 4px 0 12px;
 vertical-align:-1px}
.crops{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:8px}
figure img{display:block;width:256px;height:auto;image-rendering:pixelated}
figcaption{text-align:center;color:#445;margin-top:6px}
details pre{white-space:pre-wrap;background:#fff;border:1px solid #dde1e8;padding:10px;
 font:12px ui-monospace,Menlo,Consolas,monospace}
.none{color:#667}
"""

_BEFORE, _AFTER = "#b8bfcc", "#2f6fe4"


def write_html(report_dict: Mapping[str, Any], path: str | os.PathLike[str],
               crops: Crops | None = None, *, title: str = "model",
               meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``render_html(...)`` to ``path`` (UTF-8, atomically) and return the path."""
    check.mapping("write_html", "report_dict", report_dict, optional=False)
    path = check.path("write_html", "path", path)
    if not isinstance(title, str):
        raise check.ArgumentError(f"write_html: title must be a string, got {title!r}"[:200])
    check.mapping("write_html", "meta", meta)
    if crops is not None and (isinstance(crops, (str, bytes)) or not isinstance(
            crops, (Mapping, Sequence))):
        raise check.ArgumentError("write_html: crops must be a dict or list of (caption, PNG "
                                  f"bytes), got a {type(crops).__name__}")
    try:
        page = render_html(report_dict, crops, title=title, meta=meta).encode("utf-8")
    except (TypeError, KeyError, AttributeError, ValueError, IndexError) as exc:
        raise check.ArgumentError(
            "write_html: report_dict is not what Report.to_dict() gives "
            f"({type(exc).__name__}: {exc})"[:300]) from exc
    return write_atomic(path, lambda f: f.write(page))


def render_html(report_dict: Mapping[str, Any], crops: Crops | None = None, *,
                title: str = "model", meta: Mapping[str, Any] | None = None) -> str:
    """The page for ``Report.to_dict()``; ``crops`` are (caption, PNG bytes), shown side by
    side; ``meta`` is shown under the title (e.g. versions from the save file's header)."""
    rows = list(report_dict.get("rows", []))
    applied = [r for r in rows if r["outcome"] == APPLIED]
    other = [r for r in rows if r["outcome"] != APPLIED]
    parts = [
        f"<h1>lwcompile report: {_e(title)}</h1>",
        f'<p class="meta">{_meta(meta)}</p>',
        _cards(report_dict.get("summary"), len(applied), len(other)),
        "<h2>Rules that fired</h2>", _fired(applied, other),
        "<h2>Per-layer cost, before and after</h2>", _chart(rows),
        f"<h2>Kept, refused and rolled back ({len(other)})</h2>", _other_table(other),
        f"<h2>Rewrites ({len(applied)})</h2>", _applied_table(applied),
    ]
    if crops:
        parts += ["<h2>Outputs</h2>", _crops(crops)]
    parts.append(_log(report_dict))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>lwcompile report: {_e(title)}</title><style>{_CSS}</style></head>"
            "<body>\n" + "\n".join(parts) + "\n</body></html>\n")


def to_png(image: torch.Tensor) -> bytes:
    """An image tensor (HxW, CxHxW or 1xCxHxW; 1 or 3 channels; values in [0, 1]) as PNG."""
    x = image.detach().float().cpu()
    while x.dim() > 3:
        x = x[0]
    if x.dim() == 2:
        x = x[None]
    if x.shape[0] not in (1, 3):
        x = x[:1] if x.shape[0] < 3 else x[:3]
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    height, width, channels = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].numpy().tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    colour = 0 if channels == 1 else 2  # greyscale or RGB, 8 bits
    head = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _meta(meta: Mapping[str, Any] | None) -> str:
    if not meta:
        return "generated by lwcompile"
    return " &middot; ".join(f"{_e(k)} <b>{_e(v)}</b>" for k, v in meta.items())


def _card(label: str, before: float | None, after: float | None, unit: str = "") -> str:
    ratio = "&nbsp;"
    if before and after:
        ratio = f"{before / after:.1f}&times; fewer" if after <= before else \
            f'<span class="r up">{after / before:.2f}&times; more</span>'
    return (f'<div class="card"><div class="k">{label}</div>'
            f'<div class="v">{short_number(before)}{unit} &rarr; {short_number(after)}{unit}'
            f'</div><div class="r">{ratio}</div></div>')


def _cards(summary: Mapping[str, Any] | None, n_applied: int, n_other: int) -> str:
    sites = (f'<div class="card"><div class="k">Sites</div><div class="v">{n_applied} '
             f"rewritten &middot; {n_other} kept</div></div>")
    if not summary:
        return f'<div class="cards">{sites}</div>'
    mib = 2**20
    peak_b, peak_a = summary.get("peak_activation_before"), summary.get("peak_activation_after")
    return ('<div class="cards">'
            + _card("Parameters", summary["params_before"], summary["params_after"])
            + _card("MACs (example input)", summary["macs_before"], summary["macs_after"])
            + _card("Peak activations", peak_b and peak_b / mib, peak_a and peak_a / mib, " MiB")
            + sites + "</div>")


def _fired(applied: list[dict], other: list[dict]) -> str:
    rules = Counter(r["decided_by"] for r in applied)
    stops = Counter(r["decided_by"] for r in other)
    fired = "".join(f'<span class="chip">{_e(k)} &times;{v}</span>'
                    for k, v in rules.most_common()) or '<span class="none">no rule fired</span>'
    out = f"<div>{fired}</div>"
    if stops:
        out += ('<div><span class="none">sites kept, by the guard or rule that stopped them: '
                "</span>" + "".join(f'<span class="chip guard">{_e(k)} &times;{v}</span>'
                                    for k, v in stops.most_common()) + "</div>")
    return out


def _chart(rows: list[dict]) -> str:
    """One line per site: params bars on the left, MACs bars on the right (before / after)."""
    if not rows:
        return '<p class="none">no sites</p>'
    label_w, panel_w, value_w, line_h, top = 210, 300, 130, 24, 24
    width = label_w + 2 * (panel_w + value_w)
    height = top + line_h * len(rows) + 6
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="system-ui,sans-serif" font-size="12">']
    for i, (key, name) in enumerate((("params", "parameters"), ("macs", "MACs"))):
        x0 = label_w + i * (panel_w + value_w)
        out.append(f'<text x="{x0}" y="14" font-weight="600">{name}</text>')
        peak = max(max(r[f"{key}_before"], r[f"{key}_after"]) for r in rows) or 1
        for j, r in enumerate(rows):
            y = top + j * line_h
            before, after = r[f"{key}_before"], r[f"{key}_after"]
            for k, (value, colour) in enumerate(((before, _BEFORE), (after, _AFTER))):
                w = max(value / peak * panel_w, 1 if value else 0)
                out.append(f'<rect x="{x0}" y="{y + k * 9}" width="{w:.1f}" height="8" '
                           f'fill="{colour}"><title>{_e(r["site"])}: {short_number(value)}'
                           "</title></rect>")
            out.append(f'<text x="{x0 + panel_w + 8}" y="{y + 13}" fill="#445">'
                       f"{short_number(before)} &rarr; {short_number(after)}</text>")
    for j, r in enumerate(rows):
        y = top + j * line_h + 13
        site = r["site"] or "<root>"
        label = site if len(site) <= 30 else "\u2026" + site[-29:]
        colour = "#1d2330" if r["outcome"] == APPLIED else "#8a5300"
        out.append(f'<text x="0" y="{y}" fill="{colour}">{_e(label)}<title>{_e(site)}: '
                   f'{_e(r["original"])}</title></text>')
    out.append("</svg>")
    legend = (f'<div class="legend"><span style="background:{_BEFORE}"></span>before'
              f'<span style="background:{_AFTER}"></span>after &nbsp; (sites in brown were '
              "kept)</div>")
    return f'<div class="chart">{legend}{"".join(out)}</div>'


def _outcome(outcome: str) -> str:
    css = {KEPT: "o-kept", REFUSED: "o-refused"}.get(outcome, "o-rolled")
    return f'<span class="o {css}">{_e(outcome)}</span>'


def _other_table(rows: list[dict]) -> str:
    if not rows:
        return '<p class="none">every matched site was rewritten</p>'
    body = "".join(
        f"<tr><td><code>{_e(r['site'] or '<root>')}</code></td>"
        f"<td class='l'>{_e(r['original'])}</td>"
        f"<td>{_outcome(r['outcome'])}</td><td>{_e(r['decided_by'])}</td>"
        f"<td>{_e(r['reason'])}</td></tr>" for r in rows)
    return ("<table><tr><th>site</th><th>layer</th><th>outcome</th><th>decided by</th>"
            f"<th>why</th></tr>{body}</table>")


def _applied_table(rows: list[dict]) -> str:
    if not rows:
        return '<p class="none">nothing was rewritten</p>'
    body = "".join(
        f"<tr><td><code>{_e(r['site'] or '<root>')}</code></td>"
        f"<td class='l'>{_e(r['original'])}</td>"
        f"<td>{_e(r['replacement'])}</td><td>{_e(r['decided_by'])}</td>"
        f'<td class="n">{short_number(r["params_before"])} &rarr; '
        f'{short_number(r["params_after"])}</td>'
        f'<td class="n">{short_number(r["macs_before"])} &rarr; '
        f'{short_number(r["macs_after"])}</td></tr>'
        for r in rows)
    return ("<table><tr><th>site</th><th>layer</th><th>replaced by</th><th>rule</th>"
            f"<th>params</th><th>MACs</th></tr>{body}</table>")


def _crops(crops: Crops) -> str:
    items = crops.items() if isinstance(crops, Mapping) else crops
    figures = "".join(
        f'<figure><img alt="{_e(label)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{_e(label)}</figcaption></figure>'
        for label, png in items)
    return f'<div class="crops">{figures}</div>'


def _log(report_dict: Mapping[str, Any]) -> str:
    lines = list(report_dict.get("log", []))
    skips = (report_dict.get("notes") or {}).get("concat_skips") or []
    lines += [f"concat skip {s.get('concat')}: {', '.join(map(str, s.get('inputs', [])))}"
              for s in skips]
    if not lines:
        return ""
    return (f"<h2>Log</h2><details><summary>{len(lines)} lines: sites no rule matched, code "
            f"tracing could not see, concat skips</summary><pre>{_e(chr(10).join(lines))}"
            "</pre></details>")
