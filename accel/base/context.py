"""What a method may read while the pipeline runs: the denoising step and the token layout."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

Grid = Tuple[int, int, int]  # (T, H, W) in tokens, after patching

BRANCH_COND = "cond"
BRANCH_UNCOND = "uncond"
BRANCH_BATCHED = "cond_uncond"  # one call carries both CFG halves stacked on the batch axis


@dataclass
class StepContext:
    """Where the denoising loop is. One per handle, shared by every patched transformer.

    ``step_index`` counts scheduler steps (not transformer calls): Wan calls the transformer
    twice per step (cond, uncond) and Wan 2.2 switches between two transformers, yet both see
    the same step. ``branch`` names the CFG half of the current call: diffusers pipelines say it
    through ``cache_context``; without one, the call order within the step decides.
    """

    step_index: int = 0
    num_steps: Optional[int] = None
    timestep: Optional[float] = None
    sigma: Optional[float] = None
    branch: str = BRANCH_COND
    call_index: int = 0  # transformer calls made so far within this step
    generations: int = 0  # completed or started denoising loops
    steps_run: int = 0  # scheduler steps over the handle's lifetime
    calls_by_branch: Dict[str, int] = field(default_factory=dict)

    def begin_generation(self, num_steps: Optional[int]) -> None:
        self.step_index = 0
        self.num_steps = num_steps
        self.call_index = 0
        self.timestep = None
        self.sigma = None
        self.generations += 1

    def end_step(self) -> None:
        self.step_index += 1
        self.steps_run += 1
        self.call_index = 0

    def begin_call(self, branch: str, timestep: Optional[float], sigma: Optional[float]) -> None:
        self.branch = branch
        self.timestep = timestep
        self.sigma = sigma
        self.calls_by_branch[branch] = self.calls_by_branch.get(branch, 0) + 1

    def end_call(self) -> None:
        self.call_index += 1

    @property
    def progress(self) -> Optional[float]:
        """Fraction of the loop done before this step, in [0, 1); None when the length is unknown."""
        if not self.num_steps:
            return None
        return self.step_index / self.num_steps


@dataclass(frozen=True)
class TokenLayout:
    """How the tokens of one transformer call are laid out.

    ``grid`` is the video (or image, T=1) token grid in frame-major order; ``text_tokens`` counts
    text tokens that share the attention sequence (joint attention; also other tokens that sparse
    patterns must keep dense, like LTX's conditioning latents) and ``text_position`` says whether
    they come before ("prefix") or after ("suffix") the visual tokens.
    """

    grid: Optional[Grid] = None
    text_tokens: int = 0
    text_position: Optional[str] = None  # "prefix", "suffix" or None

    @property
    def visual_tokens(self) -> Optional[int]:
        if self.grid is None:
            return None
        t, h, w = self.grid
        return t * h * w


@dataclass(frozen=True)
class AttnContext:
    """Everything an attention method gets besides q, k, v (each (B, S, H, D))."""

    layer_index: int  # position among the model's intercepted attention sites
    num_layers: int
    site: str  # module path inside the transformer, e.g. "blocks.3.attn1"
    kind: str  # "self" (visual tokens only) or "joint" (text tokens in the same sequence)
    heads: int  # the module's heads; q, k, v may hold a slice of them (context parallelism)
    layout: TokenLayout
    step: StepContext
    head_offset: int = 0  # the module's index of q's first head (Ulysses: rank x heads per rank)
