"""Procedural text-to-video data for the reference model and its judge.

Each clip shows one coloured shape on a background, doing one motion, and is
described by a caption such as ``"a red circle moving left on a dark
background"``.  The vocabulary is closed (4 shapes x 6 colours x 6 motions x
3 backgrounds = 432 combinations), so a tiny model can learn it in minutes and
a tiny classifier (``judge.py``) can check whether a generated video follows
its prompt.

Rendering is vectorised torch (signed distance fields with a one-pixel
anti-aliased edge), so the trainer can draw large batches directly on the GPU.
The random jitter (size, position, travel distance, colour and background
tone) is always drawn on the CPU from a ``torch.Generator``: the same seed
gives the same clip on any device, up to float rounding.

Held-out split: a combination is held out when
``(shape + 2*colour + 3*motion + 5*background) % 7 == 3`` (indices into the
tuples below).  That is 62 of the 432 combinations (~14%), spread evenly over
every attribute value, and every value (and every pair of values) still
appears in training.  The held-out prompts are never seen by the generator
during training, so prompt accuracy on them measures composition.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # name -> RGB in [0,1]; no black (it would vanish on the dark background)
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.25),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "white": (0.95, 0.95, 0.95),
    "purple": (0.65, 0.25, 0.85),
}
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "growing", "shrinking")
BACKGROUNDS = ("dark", "gray", "checkered")
COLOUR_NAMES = tuple(COLOURS)

# Start positions of the generator's clips are drawn from the central 20% of
# the room a shape has (``sample_params(spread=...)``): each prompt is then
# close to one template (size, travel, tones and a few pixels of position still
# vary with the seed), which narrows what the generator has to learn.  The judge
# trains with spread 1.0, so it reads shapes anywhere and its weights are the
# same as before this knob existed.
SPREAD = 0.2

# Default clip: 29 frames of 64 x 128 pixels.  With the reference VAE (8x
# spatial, 4x temporal compression) that is an 8 x 8 x 16 latent grid, i.e.
# 8 * 8 * 16 = 1024 transformer tokens with patch size (1, 1, 1).
NUM_FRAMES, HEIGHT, WIDTH = 29, 64, 128


class Spec(NamedTuple):
    shape: str
    colour: str
    motion: str
    background: str


def caption(spec: Spec) -> str:
    return f"a {spec.colour} {spec.shape} {spec.motion} on a {spec.background} background"


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order (tokenizer ids follow it)."""
    words = ["a", "on", "background"]
    for group in (SHAPES, COLOUR_NAMES, BACKGROUNDS):
        words += list(group)
    for motion in MOTIONS:
        words += [w for w in motion.split() if w not in words]
    return words


def spec_index(spec: Spec) -> tuple[int, int, int, int]:
    return (SHAPES.index(spec.shape), COLOUR_NAMES.index(spec.colour),
            MOTIONS.index(spec.motion), BACKGROUNDS.index(spec.background))


def spec_from_index(idx: Sequence[int]) -> Spec:
    s, c, m, b = (int(i) for i in idx)
    return Spec(SHAPES[s], COLOUR_NAMES[c], MOTIONS[m], BACKGROUNDS[b])


def all_specs() -> list[Spec]:
    return [Spec(s, c, m, b) for s in SHAPES for c in COLOUR_NAMES for m in MOTIONS for b in BACKGROUNDS]


def is_held_out(spec: Spec) -> bool:
    s, c, m, b = spec_index(spec)
    return (s + 2 * c + 3 * m + 5 * b) % 7 == 3


def train_specs() -> list[Spec]:
    return [s for s in all_specs() if not is_held_out(s)]


def held_out_specs() -> list[Spec]:
    return [s for s in all_specs() if is_held_out(s)]


def training_captions(count: int) -> list[str]:
    """``count`` captions spread evenly over the training combinations (for calibrations: never held out)."""
    specs = train_specs()
    return [caption(specs[i * len(specs) // count]) for i in range(count)]


def specs_to_tensor(specs: Sequence[Spec]) -> torch.Tensor:
    """(N, 4) long tensor of (shape, colour, motion, background) indices."""
    return torch.tensor([spec_index(s) for s in specs], dtype=torch.long).reshape(-1, 4)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def sample_params(idx: torch.Tensor, height: int, width: int, generator: torch.Generator | None = None,
                  spread: float = SPREAD) -> dict[str, torch.Tensor]:
    """Draw the per-clip jitter on the CPU (device independent).

    Sizes and distances scale with the frame so other resolutions still look
    alike; all draws happen for every clip in the same order whatever its
    spec, so clip i of a batch depends only on the generator state.
    ``spread`` is the fraction of the free room, centred, that start positions
    are drawn from (1.0: anywhere the shape stays in frame).
    """
    if not 0.0 <= spread <= 1.0:
        raise ValueError(f"spread must be in [0, 1], got {spread}")
    n = idx.shape[0]
    g = generator
    m = idx[:, 2].double()
    translating = m < 4
    r_move = _uniform(n, 0.14, 0.20, g) * height
    r_small = _uniform(n, 0.08, 0.11, g) * height
    r_large = _uniform(n, 0.24, 0.30, g) * height
    travel_frac = _uniform(n, 0.30, 0.45, g)
    u_lo, u_hi = 0.5 - spread / 2, 0.5 + spread / 2
    u_x, u_y = _uniform(n, u_lo, u_hi, g), _uniform(n, u_lo, u_hi, g)
    colour_jit = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * 0.1
    bg_jit = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 0.06
    checker_phase = torch.rand(n, 2, generator=g, dtype=torch.float64) * 16

    growing, shrinking = m == 4, m == 5
    r0 = torch.where(translating, r_move, torch.where(growing, r_small, r_large))
    r1 = torch.where(translating, r_move, torch.where(growing, r_large, r_small))
    extent = 1.2 * torch.maximum(r0, r1) + 1.0  # bounding half-size of any shape, plus a pixel
    horizontal, vertical = (m == 0) | (m == 1), (m == 2) | (m == 3)
    dist = torch.where(horizontal, travel_frac * width, torch.where(vertical, travel_frac * height,
                                                                    torch.zeros_like(m)))
    # Start positions are chosen so the shape stays fully in frame for the whole clip.
    span_x = width - 2 * extent - torch.where(horizontal, dist, 0.0)
    span_y = height - 2 * extent - torch.where(vertical, dist, 0.0)
    x_lo = extent + u_x * span_x.clamp(min=0)
    y_lo = extent + u_y * span_y.clamp(min=0)
    x0 = torch.where(m == 0, x_lo + dist, x_lo)
    y0 = torch.where(m == 2, y_lo + dist, y_lo)
    dx = torch.where(m == 0, -dist, torch.where(m == 1, dist, 0.0))
    dy = torch.where(m == 2, -dist, torch.where(m == 3, dist, 0.0))
    base = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float64)
    colour = (base[idx[:, 1]] + colour_jit).clamp(0, 1)
    return {"x0": x0, "y0": y0, "dx": dx, "dy": dy, "r0": r0, "r1": r1, "colour": colour,
            "bg_jit": bg_jit, "checker_phase": checker_phase, "shape": idx[:, 0], "background": idx[:, 3]}


def _shape_sdf(shape: torch.Tensor, px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) of each clip's shape; all four are
    evaluated and one is selected, which keeps the batch fully vectorised."""
    ax, ay = px.abs(), py.abs()
    circle = torch.sqrt(px * px + py * py) - r
    square = torch.maximum(ax, ay) - 0.85 * r
    # Equilateral triangle pointing up, inradius 0.7r, shifted so its bounding
    # box is centred (apex at -1.05r, base at +1.05r; image y grows downwards).
    ty = py + 0.35 * r
    triangle = torch.maximum(ty, 0.5 * math.sqrt(3.0) * ax - 0.5 * ty) - 0.7 * r
    arm = 0.38 * r
    cross = torch.minimum(torch.maximum(ax - r, ay - arm), torch.maximum(ax - arm, ay - r))
    s = shape.view(-1, 1, 1, 1)
    return torch.where(s == 0, circle, torch.where(s == 1, square, torch.where(s == 2, triangle, cross)))


def render(params: dict[str, torch.Tensor], num_frames: int, height: int, width: int,
           device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
           return_alpha: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Render clips from :func:`sample_params`; returns (N, T, 3, H, W) in [0, 1]
    (and the shape's coverage, (N, T, 1, H, W), if ``return_alpha``)."""
    p = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in params.items()}
    n = p["x0"].shape[0]
    t = torch.linspace(0, 1, num_frames, device=device, dtype=dtype).view(1, -1, 1, 1)
    col = lambda v: v.view(n, 1, 1, 1)  # noqa: E731
    cx = col(p["x0"]) + col(p["dx"]) * t
    cy = col(p["y0"]) + col(p["dy"]) * t
    r = col(p["r0"]) + (col(p["r1"]) - col(p["r0"])) * t
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5).view(1, 1, 1, -1)
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5).view(1, 1, -1, 1)
    sdf = _shape_sdf(p["shape"], xs - cx, ys - cy, r)  # (N, T, H, W)
    alpha = (0.5 - sdf).clamp(0, 1).unsqueeze(2)  # one-pixel anti-aliased edge

    bg_kind = p["background"].view(n, 1, 1)
    phase = p["checker_phase"]
    cells = (torch.floor((xs[0, 0] + phase[:, 0].view(n, 1, 1)) / 8)
             + torch.floor((ys[0, 0] + phase[:, 1].view(n, 1, 1)) / 8)) % 2  # (N, H, W)
    tone = p["bg_jit"].view(n, 1, 1)
    bg = torch.where(bg_kind == 0, 0.06 + tone, torch.where(bg_kind == 1, 0.45 + tone,
                                                            0.12 + 0.18 * cells + tone))
    bg = bg.view(n, 1, 1, height, width).expand(n, 1, 3, height, width)
    colour = p["colour"].view(n, 1, 3, 1, 1)
    clips = (bg * (1 - alpha) + colour * alpha).clamp(0, 1)
    return (clips, alpha) if return_alpha else clips


def make_batch(specs: Sequence[Spec] | torch.Tensor, num_frames: int = NUM_FRAMES, height: int = HEIGHT,
               width: int = WIDTH, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", spread: float = SPREAD) -> torch.Tensor:
    """(N, T, 3, H, W) float clips in [0, 1] for ``specs`` (Spec list or (N, 4) indices)."""
    idx = specs if isinstance(specs, torch.Tensor) else specs_to_tensor(specs)
    return render(sample_params(idx.cpu(), height, width, generator, spread), num_frames, height, width, device)


def make_clip(spec: Spec, num_frames: int = NUM_FRAMES, height: int = HEIGHT, width: int = WIDTH,
              rng: torch.Generator | int | None = None) -> torch.Tensor:
    """One clip, (T, 3, H, W) float32 in [0, 1].  ``rng``: a CPU torch.Generator or an int seed."""
    if isinstance(rng, int):
        rng = torch.Generator().manual_seed(rng)
    return make_batch([spec], num_frames, height, width, generator=rng)[0]


def random_specs(n: int, generator: torch.Generator | None = None, held_out: bool = False) -> torch.Tensor:
    """(n, 4) indices drawn uniformly from the train (or held-out) combinations."""
    pool = specs_to_tensor(held_out_specs() if held_out else train_specs())
    return pool[torch.randint(len(pool), (n,), generator=generator)]
