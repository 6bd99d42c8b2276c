"""LTX-Video (``LTXVideoTransformer3DModel``): pre-packed tokens, video-only self-attention."""
from __future__ import annotations

import torch

from accel.base.adapter import INVOKES_DISPATCH, BlockIO, ModelAdapter
from accel.base.context import TokenLayout
from accel.base.registry import MODEL_ADAPTERS

from .presets import family_presets


class LTXVideoAdapter(ModelAdapter):
    family = "ltx"
    transformer_class = "LTXVideoTransformer3DModel"
    pipeline_classes = ("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline")
    timestep_position = 2
    invokes = INVOKES_DISPATCH
    self_attention_paths = ("attn1",)
    cross_attention_paths = ("attn2",)
    block_stack_names = ("transformer_blocks",)
    # LTXVideoTransformerBlock.forward(hidden_states, encoder_hidden_states, temb, ...) -> hidden_states;
    # the text is read by cross-attention only.
    block_io = {"transformer_blocks": BlockIO(streams=("hidden_states",), returns=("hidden_states",))}
    teacache_coefficients = (2.14700694e01, -1.28016453e01, 2.31279151e00, 7.92487521e-01, 9.69274326e-03)
    presets = family_presets()
    default_preset = "quality"

    def teacache_input(self, first_block, block_args, captured=None):
        # The first block's self-attention input: norm1(x) * (1 + scale_msa) + shift_msa, with the
        # per-block table added to ``temb`` exactly as LTXVideoTransformerBlock does.
        hidden, temb = block_args["hidden_states"], block_args["temb"]
        table = first_block.scale_shift_table
        ada = table[None, None].to(temb.device) + temb.reshape(hidden.shape[0], temb.shape[1], table.shape[0], -1)
        shift_msa, scale_msa = ada[:, :, 0], ada[:, :, 1]
        return first_block.norm1(hidden) * (1 + scale_msa) + shift_msa

    def token_layout(self, model, args, kwargs):
        # Tokens arrive packed (B, S, C); LTXPipeline passes the latent grid explicitly, the
        # condition pipeline passes each token's coordinates instead.
        frames = self.call_arg(args, kwargs, "num_frames", 4)
        height = self.call_arg(args, kwargs, "height", 5)
        width = self.call_arg(args, kwargs, "width", 6)
        if frames is not None and height is not None and width is not None:
            p, p_t = model.config.patch_size, model.config.patch_size_t
            return TokenLayout(grid=(int(frames) // p_t, int(height) // p, int(width) // p))
        coords = self.call_arg(args, kwargs, "video_coords", 8)
        return layout_from_coords(coords[0]) if coords is not None else TokenLayout()


def layout_from_coords(coords: torch.Tensor) -> TokenLayout:
    """The video grid of LTXConditionPipeline's tokens, from one item's (3, S) (time, y, x) coordinates.

    The pipeline packs the video's latents last, frame by frame (f-major), with times starting at 0
    and increasing; conditioning latents placed at later frames come first as whole extra frames
    of the same size. So the frame size is the run of tokens sharing the last token's time, and the
    video is the longest run of frames before the end whose times increase, back to the frame at
    time 0; the tokens before it stay dense (as a "prefix", like joint text). Anything that does not
    fit that shape gets no grid (grid patterns then fall back to dense attention, with a warning).
    """
    times, rows, cols = (c.tolist() for c in coords)
    per_frame = 0
    while per_frame < len(times) and times[-1 - per_frame] == times[-1]:
        per_frame += 1
    if not per_frame or len(times) % per_frame:
        return TokenLayout()
    frame_times = times[::per_frame]
    start = len(frame_times) - 1
    while start > 0 and frame_times[start] > 0 and frame_times[start - 1] < frame_times[start]:
        start -= 1
    height, width = len(set(rows[-per_frame:])), len(set(cols[-per_frame:]))
    if height * width != per_frame:
        return TokenLayout()
    return TokenLayout(grid=(len(frame_times) - start, height, width), text_tokens=start * per_frame,
                       text_position="prefix" if start else None)


MODEL_ADAPTERS.register(LTXVideoAdapter.transformer_class, LTXVideoAdapter())
