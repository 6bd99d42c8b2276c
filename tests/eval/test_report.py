"""``accel eval``'s HTML page (eval/report.py): its content, and what a real browser shows of it."""
import base64
import io
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from accel.eval import report
from accel.eval.report import MISSING, PLOT_FACE_COLOR, TABLE_HEAD_COLOR, write_report
from accel.eval.video_io import write_video

PROMPTS = ["a red ball rolling on grass", "a cat & a dog"]
COLOURS = {"dense": (255, 0, 255), "fast": (0, 255, 255), "faster": (255, 255, 0)}


def preset_row(name, **extra):
    row = {"items": 4, "wall_seconds": 10.0, "speedup": 1.0, "speedup_min": 1.0, "speedup_max": 1.0,
           "psnr": None, "ssim": None}
    if name != "dense":
        row.update(wall_seconds=4.0, speedup=2.5, speedup_min=2.1, speedup_max=2.9, psnr=31.234, ssim=0.91234)
    row.update(extra)
    return row


def aggregate(presets):
    return {"model": "tiny-wan", "settings": {"steps": 4, "height": 32, "width": 48, "frames": 8},
            "prompts": "builtin smoke prompts", "seeds": 2, "device": "cpu", "presets": presets}


def write_run(out, presets=("dense", "fast", "faster"), prompts=PROMPTS, seeds=2, noisy=()):
    """Real mp4s in VBench's layout (one solid colour per preset; ``noisy`` ones are big) and items."""
    items, rng = [], np.random.default_rng(0)
    for preset in presets:
        os.makedirs(out / preset, exist_ok=True)
        for p, prompt in enumerate(prompts):
            for index in range(seeds):
                frames = np.empty((8, 32, 48, 3), np.uint8)
                frames[:] = COLOURS[preset]
                if preset in noisy:  # noise compresses badly: a file far bigger than the others
                    frames[:, 16:] = rng.integers(0, 256, (8, 16, 48, 3), dtype=np.uint8)
                rel = f"{preset}/{prompt}-{index}.mp4"
                write_video(str(out / rel), frames, upscale=2)
                dense = preset == "dense"
                items.append({"preset": preset, "prompt": prompt, "prompt_index": p, "seed": 100 + index,
                              "index": index, "video": rel, "wall_seconds": 10.0 if dense else 4.0,
                              "speedup": 1.0 if dense else 2.5, "psnr": None if dense else 30.0 + p + index / 10,
                              "ssim": None if dense else 0.9})
    return items


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """One set of videos for the unit tests (each copies it: writing mp4s is the slow part)."""
    out = tmp_path_factory.mktemp("run")
    return out, write_run(out)


@pytest.fixture
def run(videos, tmp_path):
    src, items = videos
    shutil.copytree(src, tmp_path / "run")
    return tmp_path / "run", [dict(it) for it in items]


def table(page):
    """The preset table as rows of cell texts (tags stripped), the header row first."""
    body = page.split('<table class="rows">', 1)[1].split("</table>", 1)[0]
    return [[re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_every_preset_has_a_row_and_the_page_is_self_contained(run):
    out, items = run
    presets = {"fast": preset_row("fast"), "dense": preset_row("dense"), "faster": preset_row("faster", speedup=3.0)}
    path = write_report(str(out), aggregate(presets), items)
    assert path == str(out / "report.html")
    page = read(path)
    rows = table(page)
    assert rows[0][:6] == ["preset", "items", "wall s", "speed-up", "PSNR dB", "SSIM"]
    assert [r[0] for r in rows[1:]] == ["dense", "fast", "faster"]  # dense first, then as given
    assert rows[2][1:6] == ["4", "4.00", "2.50\u00d7 (2.10\u20132.90)", "31.23", "0.9123"]
    assert rows[1][3:6] == ["1.00\u00d7", MISSING, MISSING]  # dense against itself: no PSNR/SSIM
    for text in ("tiny-wan", "steps=4, height=32, width=48, frames=8", "builtin smoke prompts", "2 per prompt"):
        assert text in page
    # Nothing fetched from elsewhere: no scripts, style sheets, fonts or remote URLs.
    assert not re.search(r"<script|<link|@import|https?://|url\(", page)
    assert "Pareto plot not drawn" not in page
    # The plot: a PNG inline, with the plot's face colour.
    png = base64.b64decode(re.search(r'class="plot"[^>]*src="data:image/png;base64,([^"]+)"', page).group(1))
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert (pixels == hex_rgb(PLOT_FACE_COLOR)).all(-1).mean() > 0.3
    # Players: the first 4 items by (prompt, seed index) of each non-dense preset, next to dense.
    assert page.count("<video ") == 2 * 2 * 4
    assert page.count('<div class="pair">') == 8
    assert "seed 100 \u00b7 PSNR 30.00 dB \u00b7 SSIM 0.9000 \u00b7 speed-up 2.50\u00d7" in page


def test_players_take_the_first_items_in_prompt_then_seed_order(run):
    out, items = run
    presets = {"dense": preset_row("dense"), "fast": preset_row("fast")}
    page = read(write_report(str(out), aggregate(presets), list(reversed(items)), players=3))
    captions = re.findall(r'class="note">(seed \d+) \u00b7 PSNR ([\d.]+)', page)
    assert captions == [("seed 100", "30.00"), ("seed 101", "30.10"), ("seed 100", "31.00")]
    assert "<video" not in read(write_report(str(out), aggregate(presets), items, players=0))


def test_prompt_text_is_escaped(run):
    out, items = run
    evil = '<script>alert("x")</script> & <b>bold</b>'
    for it in items:
        it["prompt"] = evil
    presets = {"dense": preset_row("dense"), "<i>fast</i>": preset_row("fast")}
    for it in items:
        if it["preset"] == "fast":
            it["preset"] = "<i>fast</i>"
    page = read(write_report(str(out), aggregate(presets) | {"model": "<b>model</b>"}, items))
    assert "<script" not in page and "<b>" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "&lt;i&gt;fast&lt;/i&gt;" in page and "&lt;b&gt;model&lt;/b&gt;" in page


def test_optional_columns_appear_only_when_a_preset_has_them_and_missing_values_are_dashes(run):
    out, items = run
    plain = {"dense": preset_row("dense"), "fast": preset_row("fast")}
    header = table(read(write_report(str(out), aggregate(plain), items)))[0]
    assert header == ["preset", "items", "wall s", "speed-up", "PSNR dB", "SSIM"]

    rich = {"dense": preset_row("dense", vbench={"subject_consistency": 0.95}, fvd=float("inf")),
            "fast": preset_row("fast", lpips=0.0812, compute_fraction=0.41, patch="first-block cache",
                               vbench={"subject_consistency": 0.9412, "motion_smoothness": 0.98}),
            "faster": preset_row("faster", prompt_accuracy=0.75, fid=12.345)}
    rows = table(read(write_report(str(out), aggregate(rich), items)))
    assert rows[0] == ["preset", "patch", "items", "wall s", "speed-up", "PSNR dB", "SSIM", "LPIPS", "compute",
                       "prompt accuracy", "FID", "FVD", "VBench subject_consistency", "VBench motion_smoothness"]
    cells = {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    assert cells["fast"]["LPIPS"] == "0.081" and cells["faster"]["LPIPS"] == MISSING
    assert cells["fast"]["compute"] == "41.0%" and cells["faster"]["prompt accuracy"] == "75.0%"
    assert cells["faster"]["FID"] == "12.3" and cells["dense"]["FVD"] == "\u221e"
    assert cells["fast"]["patch"] == "first-block cache" and cells["dense"]["patch"] == MISSING
    assert cells["fast"]["VBench subject_consistency"] == "0.9412"
    assert cells["dense"]["VBench motion_smoothness"] == MISSING
    assert cells["faster"]["VBench subject_consistency"] == MISSING


def test_small_videos_are_embedded_and_a_big_one_is_linked(tmp_path, monkeypatch):
    out = tmp_path / "run"
    items = write_run(out, presets=("dense", "fast"), prompts=["a dog, running #1"], seeds=1, noisy=("fast",))
    small, big = (os.path.getsize(out / it["video"]) for it in items)
    assert big > 2 * small
    monkeypatch.setattr(report, "EMBED_LIMIT_BYTES", (small + big) // 2)
    page = read(write_report(str(out), aggregate({"dense": preset_row("dense"), "fast": preset_row("fast")}), items))
    embedded = re.findall(r'<video [^>]*src="data:video/mp4;base64,([^"]+)"', page)
    assert [base64.b64decode(e) for e in embedded] == [(out / items[0]["video"]).read_bytes()]
    # The big one by its relative path, URL-quoted (file names are prompts): the folder can move.
    assert '<video controls loop muted autoplay playsinline src="fast/a%20dog%2C%20running%20%231-0.mp4"' in page
    assert "1 file(s) over" in page


def test_images_are_shown_with_img(tmp_path):
    out = tmp_path / "run"
    items = []
    for preset, colour in (("dense", (255, 0, 0)), ("fast", (0, 0, 255))):
        os.makedirs(out / preset)
        Image.new("RGB", (16, 16), colour).save(out / preset / "a cat-0.png")
        items.append({"preset": preset, "prompt": "a cat", "prompt_index": 0, "seed": 0, "index": 0,
                      "video": f"{preset}/a cat-0.png", "wall_seconds": 1.0, "speedup": 1.0,
                      "psnr": None, "ssim": None})
    page = read(write_report(str(out), aggregate({"dense": preset_row("dense"), "fast": preset_row("fast")}), items))
    assert page.count('<img src="data:image/png;base64,') == 2 and "<video" not in page


def test_only_the_dense_preset(run):
    out, items = run
    items = [it for it in items if it["preset"] == "dense"]
    page = read(write_report(str(out), aggregate({"dense": preset_row("dense")}), items))
    assert [r[0] for r in table(page)] == ["preset", "dense"]
    assert "Only the dense preset was run: nothing to plot." in page
    assert "<video" not in page and "<img" not in page


def test_without_matplotlib_the_page_says_so(run, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    out, items = run
    page = read(write_report(str(out), aggregate({"dense": preset_row("dense"), "fast": preset_row("fast")}), items))
    assert "Pareto plot not drawn: matplotlib is not installed" in page and 'class="plot"' not in page
    assert "<video" in page


# ----------------------------------------------------------------------------------------------
# A real browser: headless Chromium renders the page, and the screenshot's pixels are checked.

def hex_rgb(colour):
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("Chromium not installed: apt-get install chromium")


def near(pixels, rgb, tolerance):
    return (np.abs(pixels - np.array(rgb)) <= tolerance).all(-1)


def test_headless_chromium_shows_the_table_the_plot_and_the_videos(tmp_path, monkeypatch):
    binary = chromium()
    out = tmp_path / "run"
    items = write_run(out, prompts=PROMPTS[:1], seeds=2, noisy=("faster",))
    sizes = {it["preset"]: os.path.getsize(out / it["video"]) for it in items}
    monkeypatch.setattr(report, "EMBED_LIMIT_BYTES", (sizes["fast"] + sizes["faster"]) // 2)  # faster is linked
    presets = {"dense": preset_row("dense"), "fast": preset_row("fast", lpips=0.1),
               "faster": preset_row("faster", speedup=3.4, speedup_min=3.0, speedup_max=3.9, psnr=27.5)}
    path = write_report(str(out), aggregate(presets), items, players=2)
    assert 'src="faster/' in read(path) and 'src="fast/' not in read(path)

    shot = tmp_path / "shot.png"
    command = [binary, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--mute-audio",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2000",
               # let the page's virtual clock run (loads, video decoding) before the screenshot
               "--virtual-time-budget=5000", f"--screenshot={shot}", f"file://{path}"]
    if os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2000, 1400)

    # Not blank: a good share of non-white pixels, dark text, many colours.
    assert (pixels.min(-1) < 245).mean() > 0.05
    assert (pixels.max(-1) < 90).sum() > 2000
    assert len(np.unique(pixels.reshape(-1, 3) @ np.array([65536, 256, 1]))) > 50
    # The table's header row: a short band of rows wide in its colour, near the top.
    head = np.nonzero(near(pixels, hex_rgb(TABLE_HEAD_COLOR), 3).sum(1) > 300)[0]
    assert 15 < len(head) < 60 and head.max() - head.min() < 60 and head.max() < 600
    # The plot's axes: a tall block of rows wide in its face colour, below the table.
    face = np.nonzero(near(pixels, hex_rgb(PLOT_FACE_COLOR), 3).sum(1) > 400)[0]
    assert len(face) > 250 and face.min() > head.max()
    # The videos play (H.264 decoded), embedded and linked alike, below the plot.
    for preset, count in (("dense", 4), ("fast", 2), ("faster", 2)):
        shown = near(pixels, COLOURS[preset], 40)
        assert shown.sum() > count * 5000, preset
        assert np.nonzero(shown.sum(1) > 150)[0].min() > face.max(), preset
