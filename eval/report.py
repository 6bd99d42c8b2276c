"""The HTML page of ``accel eval``: one self-contained file, ``DIR/report.html``.

    write_report(out_dir, aggregate, items, players=4) -> path of the page

Sections: a header (model, call settings, device, prompt source, seeds), a table with one row per
preset (speed-up with its min-max spread, PSNR, SSIM, then every optional metric that some preset
has; a dash where a preset lacks it), a Pareto plot (PSNR against speed-up, drawn with matplotlib's
Agg canvas and inlined as a base64 PNG; without matplotlib the page says so instead) and
side-by-side players (dense | accelerated) for the first ``players`` items of every non-dense
preset. Everything is inline: no scripts, fonts, style sheets or CDNs, so the page opens offline.

Videos (and images) up to ``EMBED_LIMIT_BYTES`` each are embedded as base64 data URIs, bigger ones
are linked by their path relative to ``out_dir``: the page then still works when the folder is
moved or archived as a whole, but not when ``report.html`` is copied out alone.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
from typing import Any, Dict, List, Optional
from urllib.parse import quote

__all__ = ["write_report", "EMBED_LIMIT_BYTES", "TABLE_HEAD_COLOR", "PLOT_FACE_COLOR"]

# 4 MB per file: a short clip at eval resolutions (libx264, a few seconds) is well below it, so a
# typical report is one file to mail or upload as a CI artifact. Base64 adds a third and the dense
# clip repeats once per preset, so a much higher limit would make pages of hundreds of MB that
# browsers parse slowly (and Firefox refuses data URLs above 32 MB); longer videos are linked.
EMBED_LIMIT_BYTES = 4 * 1024 * 1024

# Distinctive flat colours (the browser test finds the table and the plot by them).
TABLE_HEAD_COLOR = "#cfe2f3"
PLOT_FACE_COLOR = "#fdf1dc"
MISSING = "\u2014"  # em dash
TIMES, DOT = "\u00d7", " \u00b7 "

_MEDIA_TYPES = {".mp4": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime", ".gif": "image/gif",
                ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}

_CSS = f"""
body {{ font-family: "Helvetica Neue", Arial, "Liberation Sans", "DejaVu Sans", sans-serif; color: #222;
       background: #fff; margin: 24px; line-height: 1.4; }}
h1 {{ font-size: 1.5em; margin: 0 0 .4em; }} h2 {{ font-size: 1.2em; margin: 1.6em 0 .5em; }}
.meta td {{ border: none; padding: 1px 12px 1px 0; text-align: left; }} .meta td:first-child {{ color: #666; }}
.scroll {{ overflow-x: auto; }}
table.rows {{ border-collapse: collapse; }}
table.rows th, table.rows td {{ border: 1px solid #999; padding: 4px 10px; text-align: right; }}
table.rows th {{ background: {TABLE_HEAD_COLOR}; font-weight: 600; }}
table.rows .name, table.rows td.text {{ text-align: left; }}
table.rows td.text {{ max-width: 360px; overflow-wrap: anywhere; font-size: .85em; }}
.spread, .note {{ color: #666; font-size: .85em; }}
img.plot {{ max-width: 100%; border: 1px solid #ccc; }}
.pair {{ display: inline-block; vertical-align: top; margin: 0 20px 20px 0; max-width: 660px; }}
.pair figure {{ display: inline-block; margin: 0 4px 0 0; }}
.pair video, .pair img {{ width: 320px; background: #eee; }}
.pair figcaption {{ font-size: .85em; color: #444; }}
.caption {{ font-size: .9em; overflow-wrap: anywhere; }}
"""


def _number(value: Any, digits: int, suffix: str = "") -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return MISSING
    if math.isnan(value):
        return MISSING
    if math.isinf(value):
        return "\u221e" if value > 0 else "-\u221e"
    return f"{value:.{digits}f}{suffix}"


def _percent(value: Any) -> str:
    return _number(value * 100, 1, "%") if isinstance(value, (int, float)) else MISSING


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# Optional per-preset metrics in table order: key, header, formatter.
_OPTIONAL: List[tuple] = [
    ("lpips", "LPIPS", lambda v: _number(v, 3)),
    ("compute_fraction", "compute", _percent),
    ("prompt_accuracy", "prompt accuracy", _percent),
    ("clip_score", "CLIP score", lambda v: _number(v, 3)),
    ("fid", "FID", lambda v: _number(v, 1)),
    ("fvd", "FVD", lambda v: _number(v, 1)),
    ("reference_fvd", "reference FVD", lambda v: _number(v, 2)),
]


def _ordered_presets(aggregate: dict) -> List[tuple]:
    presets = aggregate.get("presets", {})
    return [(n, presets[n]) for n in presets if n == "dense"] + [(n, r) for n, r in presets.items() if n != "dense"]


def _header(aggregate: dict) -> str:
    settings = aggregate.get("settings") or {}
    rows = [("Model", aggregate.get("model", MISSING)),
            ("Settings", ", ".join(f"{k}={v}" for k, v in settings.items()) or MISSING),
            ("Device", aggregate.get("device", MISSING)),
            ("Prompts", aggregate.get("prompts", MISSING)),
            ("Seeds", f"{aggregate.get('seeds', MISSING)} per prompt")]
    cells = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in rows)
    return f"<h1>accel eval: {_esc(aggregate.get('model', ''))}</h1>\n<table class=\"meta\">{cells}</table>"


def _table(presets: List[tuple]) -> str:
    rows = [r for _, r in presets]
    has = lambda key: any(r.get(key) is not None for r in rows)  # noqa: E731
    columns: List[tuple] = [(k, h, f) for k, h, f in _OPTIONAL if has(k)]
    dims: List[str] = []
    for r in rows:
        dims += [d for d in (r.get("vbench") or {}) if d not in dims]
    head = ["preset"] + (["patch"] if has("patch") else []) + ["items", "wall s", "speed-up", "PSNR dB", "SSIM"]
    head += [h for _, h, _ in columns] + [f"VBench {d}" for d in dims]
    lines = ["<div class=\"scroll\"><table class=\"rows\">",
             "<tr>" + "".join(('<th class="name">' if h in ("preset", "patch") else "<th>") + f"{_esc(h)}</th>"
                              for h in head) + "</tr>"]
    for name, r in presets:
        speed = _number(r.get("speedup"), 2, "\u00d7")
        lo, hi = r.get("speedup_min"), r.get("speedup_max")
        if name != "dense" and lo is not None and hi is not None:
            speed += f" <span class=\"spread\">({_number(lo, 2)}\u2013{_number(hi, 2)})</span>"
        cells = [f"<td class=\"name\">{_esc(name)}</td>"]
        if has("patch"):
            cells.append(f"<td class=\"text\">{_esc(r['patch']) if r.get('patch') else MISSING}</td>")
        cells += [f"<td>{_number(r.get('items'), 0)}</td>", f"<td>{_number(r.get('wall_seconds'), 2)}</td>",
                  f"<td>{speed}</td>", f"<td>{_number(r.get('psnr'), 2)}</td>", f"<td>{_number(r.get('ssim'), 4)}</td>"]
        cells += [f"<td>{fmt(r.get(k))}</td>" for k, _, fmt in columns]
        cells += [f"<td>{_number((r.get('vbench') or {}).get(d), 4)}</td>" for d in dims]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table></div>")
    return "\n".join(lines)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pareto_png(presets: List[tuple]) -> Optional[bytes]:
    """PSNR against speed-up, one labelled point per non-dense preset; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    points = [(n, r["speedup"], r["psnr"], r) for n, r in presets
              if n != "dense" and _finite(r.get("speedup")) and _finite(r.get("psnr"))]
    fig = Figure(figsize=(7.2, 4.4), dpi=100, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_facecolor(PLOT_FACE_COLOR)
    ax.grid(True, color="white", linewidth=1)
    ax.set_axisbelow(True)
    for name, x, y, r in points:
        lo, hi = r.get("speedup_min"), r.get("speedup_max")
        xerr = [[max(x - lo, 0)], [max(hi - x, 0)]] if _finite(lo) and _finite(hi) else None
        ax.errorbar([x], [y], xerr=xerr, fmt="o", color="#c0392b", ecolor="#e0a39c", capsize=3, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
    front, best = [], -math.inf  # non-dominated: no other preset is both faster and closer to dense
    for _, x, y, _r in sorted(points, key=lambda p: (-p[1], -p[2])):
        if y > best:
            front.append((x, y))
            best = y
    if len(front) > 1:
        front.sort()
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="#c0392b", alpha=.5, zorder=2)
    # Dense compared with itself has no PSNR: a reference line at speed-up 1, its marker on top.
    ax.axvline(1.0, color="#555", linestyle=":", linewidth=1)
    ax.plot([1.0], [1.0], marker="*", markersize=12, color="#333", transform=ax.get_xaxis_transform(), clip_on=False)
    ax.annotate("dense", (1.0, 1.0), xycoords=ax.get_xaxis_transform(), xytext=(6, -12),
                textcoords="offset points", fontsize=9)
    xs = [p[1] for p in points] + [1.0]
    xs += [r["speedup_max"] for _, _, _, r in points if _finite(r.get("speedup_max"))]
    ax.set_xlim(min(0.9, min(xs) * 0.95), max(xs) * 1.1)
    if points:
        ys = [p[2] for p in points]
        pad = max((max(ys) - min(ys)) * 0.15, 1.0)
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.set_xlabel("speed-up over dense (wall clock, \u00d7)")
    ax.set_ylabel("PSNR against dense (dB)")
    ax.set_title("Quality against speed-up (up and right is better)", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plot(presets: List[tuple]) -> str:
    if not any(n != "dense" for n, _ in presets):
        return "<p class=\"note\">Only the dense preset was run: nothing to plot.</p>"
    png = _pareto_png(presets)
    if png is None:
        return "<p class=\"note\">Pareto plot not drawn: matplotlib is not installed (pip install matplotlib).</p>"
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="PSNR against speed-up, one point per preset" src="data:image/png;base64,{data}">'


class _Media:
    """HTML for one video or image: embedded when small, else linked relative to out_dir."""

    def __init__(self, out_dir: str):
        self.out_dir, self.cache, self.linked = out_dir, {}, 0

    def __call__(self, rel: Optional[str], alt: str) -> str:
        if not rel:
            return f"<p class=\"note\">no file ({_esc(alt)})</p>"
        if os.path.isabs(rel):
            rel = os.path.relpath(rel, self.out_dir)
        if rel not in self.cache:
            path, ext = os.path.join(self.out_dir, rel), os.path.splitext(rel)[1].lower()
            mime = _MEDIA_TYPES.get(ext, "video/mp4")
            if os.path.isfile(path) and os.path.getsize(path) <= EMBED_LIMIT_BYTES:
                with open(path, "rb") as f:
                    src = f"data:{mime};base64," + base64.b64encode(f.read()).decode("ascii")
            else:
                src = quote(rel.replace(os.sep, "/"), safe="/")
                self.linked += 1
            self.cache[rel] = (mime, src)
        mime, src = self.cache[rel]
        if mime.startswith("image/"):
            return f"<img src=\"{_esc(src)}\" alt=\"{_esc(alt)}\">"
        return f"<video controls loop muted autoplay playsinline src=\"{_esc(src)}\" title=\"{_esc(alt)}\"></video>"


def _players(presets: List[tuple], items: List[dict], media: _Media, players: int) -> str:
    key = lambda it: (it.get("prompt_index", 0), it.get("index", 0))  # noqa: E731
    dense = {key(it): it for it in items if it.get("preset") == "dense"}
    parts = []
    for name, _ in presets:
        if name == "dense":
            continue
        chosen = sorted((it for it in items if it.get("preset") == name), key=key)[:players]
        parts.append(f"<h3>{_esc(name)}</h3>")
        if not chosen:
            parts.append("<p class=\"note\">No items.</p>")
        for it in chosen:
            ref = dense.get(key(it), {})
            stats = [f"seed {_esc(it.get('seed', MISSING))}", f"PSNR {_number(it.get('psnr'), 2)} dB",
                     f"SSIM {_number(it.get('ssim'), 4)}", f"speed-up {_number(it.get('speedup'), 2, TIMES)}"]
            if it.get("lpips") is not None:
                stats.append(f"LPIPS {_number(it.get('lpips'), 3)}")
            parts.append(
                "<div class=\"pair\">"
                f"<figure>{media(ref.get('video'), 'dense')}<figcaption>dense</figcaption></figure>"
                f"<figure>{media(it.get('video'), name)}<figcaption>{_esc(name)}</figcaption></figure>"
                f"<div class=\"caption\">{_esc(it.get('prompt', ''))}<br><span class=\"note\">{DOT.join(stats)}"
                "</span></div></div>")
    return "\n".join(parts)


def write_report(out_dir: str, aggregate: Dict[str, Any], items: List[Dict[str, Any]], *, players: int = 4) -> str:
    """Write ``out_dir/report.html`` from ``aggregate.json``'s dict and ``per_item.jsonl``'s rows; its path."""
    presets = _ordered_presets(aggregate)
    media = _Media(out_dir)
    body = [_header(aggregate), "<h2>Presets</h2>", _table(presets),
            "<p class=\"note\">speed-up: mean over items of the dense wall time over the preset's (min\u2013max in "
            "brackets); PSNR, SSIM and the other paired metrics compare each video with the dense video of the "
            "same prompt and seed.</p>",
            "<h2>Pareto plot</h2>", _plot(presets)]
    if players > 0 and any(n != "dense" for n, _ in presets):
        videos = _players(presets, items, media, players)
        body += ["<h2>Side by side</h2>", videos]
        if media.linked:
            limit = EMBED_LIMIT_BYTES
            limit = f"{limit / 2**20:.3g} MB" if limit >= 2**20 else f"{limit} bytes"
            body.append(f"<p class=\"note\">{media.linked} file(s) over {limit} are linked, "
                        "not embedded: keep report.html in its folder.</p>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>accel eval: {_esc(aggregate.get('model', ''))}</title><style>{_CSS}</style></head>\n"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
