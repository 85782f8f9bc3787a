"""The HTML report: self-contained, escaped, bars to scale, crops inlined as real PNGs."""

from __future__ import annotations

import base64
import re
import struct
import zlib

import torch

from lwcompile.html_report import render_html, to_png, write_html


def row(site, outcome="applied", params=(1000, 100), macs=(8000, 500), **extra):
    return {"site": site, "original": "Conv2d 64->64 3x3",
            "replacement": "LIST" if outcome == "applied" else "kept", "outcome": outcome,
            "decided_by": "list" if outcome == "applied" else "image-boundary", "reason": "",
            "params_before": params[0], "params_after": params[1],
            "macs_before": macs[0], "macs_after": macs[1]} | extra


REPORT = {
    "rows": [row("head", "kept", (500, 500), (4000, 4000), reason="image-facing layer"),
             row("body.0"), row("body.1", params=(2000, 200), macs=(16000, 1000)),
             row("tail", "refused", (300, 300), (2000, 2000), decided_by="list",
                 reason="18 input channels do not split <into> 4 & more")],
    "summary": {"params_before": 3800, "params_after": 1100, "macs_before": 30000,
                "macs_after": 7500, "peak_activation_before": 2**20,
                "peak_activation_after": 2**19, "param_ratio": 3.455, "mac_ratio": 4.0},
    "log": ["body.9: no rule matched"],
    "notes": {},
}


def decode_png(data: bytes) -> tuple[int, int, int, bytes]:
    """Width, height, channels and raw pixels of a PNG written by to_png (checks CRCs)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and b"IEND" in chunks
    channels = {0: 1, 2: 3}[colour]
    raw = zlib.decompress(chunks[b"IDAT"])
    lines = [raw[y * (width * channels + 1):(y + 1) * (width * channels + 1)]
             for y in range(height)]
    assert all(line[0] == 0 for line in lines)  # filter type 0: rows stored as is
    return width, height, channels, b"".join(line[1:] for line in lines)


def test_to_png_round_trips_pixels():
    image = torch.tensor([[[0.0, 1.0, 0.5], [0.25, 2.0, -1.0]]])  # 1x2x3, clamped to [0, 1]
    assert decode_png(to_png(image)) == (3, 2, 1, bytes([0, 255, 128, 64, 255, 0]))
    rgb = torch.zeros(1, 3, 2, 2)
    rgb[0, 0] = 1.0  # red
    width, height, channels, pixels = decode_png(to_png(rgb))
    assert (width, height, channels) == (2, 2, 3) and pixels == bytes([255, 0, 0] * 4)


def test_page_is_self_contained():
    page = render_html(REPORT)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page.lower() and "<link" not in page.lower()
    # the only URL is the SVG namespace, which is never fetched
    assert set(re.findall(r"https?://[^\s\"')]+", page)) == {"http://www.w3.org/2000/svg"}
    assert "url(" not in page and "@import" not in page


def test_page_lists_rules_refusals_and_summary():
    page = render_html(REPORT, title="DnCNN<3>", meta={"file": "out.pt"})
    assert "lwcompile report: DnCNN&lt;3&gt;" in page and "<b>out.pt</b>" in page
    assert "list &times;2" in page  # rules that fired
    assert "image-boundary &times;1" in page and "list &times;1" in page  # what stopped sites
    assert "3.80k &rarr; 1.10k" in page and "3.5&times; fewer" in page
    assert "30.00k &rarr; 7.50k" in page and "4.0&times; fewer" in page
    assert "1 MiB &rarr; 0.50 MiB" in page and "2.0&times; fewer" in page
    assert "2 rewritten &middot; 2 kept" in page
    # user text is escaped, never interpreted
    assert "do not split &lt;into&gt; 4 &amp; more" in page and "<into>" not in page
    assert "body.9: no rule matched" in page


def test_bars_are_to_scale():
    page = render_html(REPORT)
    widths = [float(w) for w in re.findall(r'<rect x="\d+" y="\d+" width="([\d.]+)"', page)]
    assert len(widths) == 2 * 2 * len(REPORT["rows"])  # before/after x params/MACs x rows
    params, macs = widths[:8], widths[8:]
    assert max(params) == max(macs) == 300.0  # the largest value fills its panel
    assert params[2:4] == [150.0, 15.0]  # body.0: 1000 and 100 of 2000
    assert macs[4:6] == [300.0, 18.8]  # body.1: 16000 and 1000 of 16000


def test_crops_are_inlined_side_by_side(tmp_path):
    teacher = to_png(torch.zeros(1, 4, 4))
    student = to_png(torch.ones(1, 4, 4))
    path = write_html(REPORT, tmp_path / "r.html",
                      crops=[("teacher", teacher), ("student", student)])
    page = path.read_text(encoding="utf-8")
    found = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert [(label, base64.b64decode(data)) for label, data in found] == [
        ("teacher", teacher), ("student", student)]
    assert 'class="crops"' in page
    assert "data:image/png" not in render_html(REPORT)


def test_empty_report():
    page = render_html({"rows": [], "summary": None})
    assert "no rule fired" in page and "no sites" in page and "nothing was rewritten" in page
