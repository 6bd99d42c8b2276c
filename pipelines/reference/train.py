"""Train the reference text-to-video model in one command, within a wall budget.

    python -m accel.pipelines.reference.train --out DIR --device cuda --seed 0

Stages (budgets in minutes; the whole run took ~8.3 minutes on one H100 with the
earlier Wan 2.1-VAE design, and has not been timed on a GPU with this one; the
CPU command in the README, 45 + 50 minute budgets, took 104 minutes on 2 cores):

1. VAE (``AutoencoderKLWan``, Wan 2.2's residual kind): reconstruction (L1 +
   MSE, shape pixels weighted up) plus a small KL on 9-frame procedural clips
   rendered on the device every step, residual branches starting at zero.  Wan's
   encode/decode walk the clip chunk by chunk with causal caches (and its
   temporal resampling only exists on that path); ``build.single_pass`` computes
   the same function over the whole clip in one call, which is what makes
   VAE training fast.  The held-out PSNR is measured on the real path.
2. Encode a fixed set of clips to latents (posterior mean), measure the
   per-channel mean/std and write them into the VAE config as
   ``latents_mean``/``latents_std``; the pipeline un-normalises with them.
3. Text encoder + transformer, jointly, with rectified flow matching in Wan's
   convention: ``x_t = (1 - s) x0 + s * noise``, timestep ``1000 s``, target
   ``noise - x0``.  The pipeline's schedulers step ``x <- x + (s' - s) v``
   (Euler) or recover ``x0 = x_t - s v`` (UniPC flow prediction), both of
   which assume exactly this target.  ``s`` is drawn as the inference
   schedule's shift of a uniform draw; 10% of captions are dropped to the
   empty prompt so classifier-free guidance works.  Shape tokens are weighted
   up, every block starts as the identity, cross-attention sees the pipeline's
   ~500 zero pads as one key with a log-count bias (``text.folded_text_padding``:
   the same function, far fewer keys); ``--dit-pad-init`` (off by default)
   starts it looking past them (``text.init_attention_past_padding``: at the
   default init they hold 97% of its softmax), and ``--dit-mix`` trains most steps
   on the first 1-2 latent frames (exact shorter clips: the VAE is causal),
   which is what makes the stage affordable on a CPU.  AdamW, bf16 autocast on
   CUDA, EMA weights are the ones saved.
4. ``save_pretrained(DIR)`` (fp32, ~17 MB) and ``train_log.json``; then, if
   the judge is available, generate every held-out prompt and log the judge's
   prompt accuracy.

Each stage calibrates its step count from the speed of its first steps and
then runs a fixed number of steps (logged), so ``--vae-steps``/``--dit-steps``
reproduce a run exactly (up to CUDA nondeterminism).  The run can be split
where the VAE ends: ``--stop-after vae`` saves ``OUT/vae`` and the log, and
``--vae-from OUT`` starts the next run at stage 2 with that VAE (two device
calls of ~5 minutes instead of one of ~9).  ``--dit-from DIR`` continues stage 3 from a
finished run (its VAE and latent statistics, text encoder and transformer), so the transformer
can be trained longer in pieces that each fit one budget; use a new ``--seed`` per piece for
fresh clips and noise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from accel.base.cli_args import integer, set_threads
from accel.pipelines.reference import data
from accel.pipelines.reference.build import (REFERENCE_DEFAULTS, ReferenceConfig, build_components, count_params,
                                             fast_decode, fast_encode, vae_layout, zero_init_residual_branches)
from accel.pipelines.reference.text import caption_tokens, encode_text, folded_text_padding, init_attention_past_padding


def log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def render_batch(n, frames, height, width, gen, device, held_out=False, return_alpha=False):
    """(N, 3, T, H, W) clips in [-1, 1] (the VAE's layout and range), spec indices
    and, optionally, the shape coverage (N, 1, T, H, W)."""
    idx = data.random_specs(n, gen, held_out=held_out)
    params = data.sample_params(idx, height, width, gen)
    clips, alpha = data.render(params, frames, height, width, device, return_alpha=True)
    x = clips.permute(0, 2, 1, 3, 4) * 2 - 1
    return (x, idx, alpha.permute(0, 2, 1, 3, 4)) if return_alpha else (x, idx)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Budget:
    """Turns a time budget into a fixed step count, timed on steps [warm, warm + probe)
    so that one-off costs (cuDNN autotuning, compilation) do not skew the plan."""

    def __init__(self, minutes: float, fixed_steps: int | None, max_steps: int | None,
                 warm: int = 5, probe: int = 20):
        self.seconds, self.fixed, self.cap = minutes * 60, fixed_steps, max_steps
        self.warm, self.probe = warm, probe
        self.start = time.time()
        self.t_warm = None
        self.total = fixed_steps or 10**9
        if max_steps:
            self.total = min(self.total, max_steps)

    def plan(self, step: int, device) -> None:
        """Call after finishing ``step`` steps."""
        if self.fixed is not None or step not in (self.warm, self.warm + self.probe):
            return
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.time()
        if step == self.warm:
            self.t_warm = now
            return
        per_step = (now - self.t_warm) / self.probe
        self.total = max(step + 1, step + int((self.seconds - (now - self.start)) / per_step * 0.97))
        if self.cap:
            self.total = min(self.total, self.cap)
        log(f"  {per_step * 1000:.0f} ms/step -> {self.total} steps")

    def done(self, step: int) -> bool:
        # the hard stop keeps the wall budget even if steps slow down later
        return step >= self.total or (self.fixed is None and time.time() - self.start > self.seconds * 1.05)


def train_vae(vae, args, device, gen, noise_gen, autocast):
    if args.vae_zero_init:
        zero_init_residual_branches(vae)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    budget = Budget(args.minutes_vae, args.vae_steps, args.max_steps)
    step, hist = 0, []
    while not budget.done(step):
        x, _, alpha = render_batch(args.vae_batch, args.vae_frames, args.height, args.width, gen, device,
                                   return_alpha=True)
        if args.vae_crop:
            # Random crops (whole clip length): the VAE is convolutional (its mid-block
            # attention has no positions), and conv cost scales with pixels, so crops
            # buy ~4x more steps per minute than full frames.
            ch, cw = args.vae_crop
            top = int(torch.randint(0, args.height - ch + 1, (1,), generator=gen)) // 8 * 8  # whole latent cells
            left = int(torch.randint(0, args.width - cw + 1, (1,), generator=gen)) // 8 * 8  # whole latent cells
            x = x[..., top:top + ch, left:left + cw]
            alpha = alpha[..., top:top + ch, left:left + cw]
        # The shape covers ~3% of the pixels: without extra weight the VAE first learns the
        # (textured) backgrounds and returns colourless ghosts of the shapes (seen on H100).
        weight = 1 + args.fg_weight * alpha
        weight = weight / weight.mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, budget.total, args.vae_lr, 50)
        with autocast():
            post = fast_encode(vae, x)
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=noise_gen, device=device)
            rec = fast_decode(vae, z, clamp=False).float()  # no clamp: keep gradients at the range ends
        err = rec - x
        l1, mse = (err.abs() * weight).mean(), (err.pow(2) * weight).mean()
        kl = 0.5 * (post.mean.float() ** 2 + post.var.float() - 1 - post.logvar.float()).mean()
        loss = l1 + mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        hist.append((l1.item(), mse.item(), kl.item()) if step % 10 == 0 or budget.done(step + 1) else None)
        budget.plan(step + 1, device)
        if step % args.log_every == 0:
            log(f"vae step {step}/{budget.total} l1 {l1.item():.4f} mse {mse.item():.5f} kl {kl.item():.3f}")
        step += 1
    vae.eval()
    last = [h for h in hist if h is not None][-5:]
    return {"steps": step, "seconds": round(time.time() - budget.start, 1),
            "final_l1": sum(h[0] for h in last) / len(last), "final_mse": sum(h[1] for h in last) / len(last),
            "final_kl": sum(h[2] for h in last) / len(last)}


@torch.no_grad()
def encode_dataset(vae, args, device, gen, autocast):
    """Latents (posterior means) of ``--dataset-clips`` training clips, their spec indices, and
    the shape's coverage of each latent cell (frame 0 alone, then the most of each 4 frames)."""
    lat, idxs, cover = [], [], []
    for start in range(0, args.dataset_clips, args.encode_batch):
        n = min(args.encode_batch, args.dataset_clips - start)
        x, idx, alpha = render_batch(n, args.num_frames, args.height, args.width, gen, device, return_alpha=True)
        with autocast():
            lat.append(fast_encode(vae, x).mean.to(torch.bfloat16 if device.type == "cuda" else torch.float32))
        idxs.append(idx)
        rest = alpha[:, :, 1:].unflatten(2, (-1, 4)).amax(3)
        f = args.height // lat[-1].shape[-2]
        cover.append(F.avg_pool3d(torch.cat([alpha[:, :, :1], rest], 2), (1, f, f)).half())
    return torch.cat(lat), torch.cat(idxs), torch.cat(cover)


@torch.no_grad()
def vae_check(vae, args, device, gen, autocast, n=32) -> dict:
    """PSNR of held-out clips through the pipeline's own (chunked) encode/decode, and
    the largest gap between that path and the single-pass one used for training."""
    x, idx = render_batch(n, args.num_frames, args.height, args.width, gen, device, held_out=True)
    with autocast():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
    mse = ((rec - x) / 2).pow(2).mean(dim=(1, 3, 4))  # per clip, per frame, on [0, 1]
    psnr = float((10 * torch.log10(1 / mse.clamp(min=1e-10))).mean())
    x2 = x[:2].float()
    gap = (vae.encode(x2).latent_dist.mean - fast_encode(vae, x2).mean).abs().max()
    result = {"heldout_psnr_db": round(psnr, 2), "single_pass_gap": float(gap)}
    # PSNR hides the failure that matters: a VAE that keeps the backgrounds and blurs the small
    # shape away scores ~24 dB, and then no DiT can follow its prompts (first H100 run: the judge
    # read only 12% of reconstructed real clips correctly). The judge on reconstructions is the
    # ceiling of the model's prompt accuracy.
    try:
        from accel.pipelines.reference import judge as J

        judge = J.load_judge()
    except FileNotFoundError:
        return result
    specs = [data.spec_from_index(i.tolist()) for i in idx]
    videos = ((rec.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4).cpu()
    result["judge_on_reconstructions"] = {**J.attribute_accuracy(videos, specs, judge),
                                          "prompt": J.prompt_accuracy(videos, specs, judge)}
    return result


def shifted_sigmas(n, shift, gen, device):
    u = torch.rand(n, generator=gen, device=device)
    return shift * u / (1 + (shift - 1) * u)  # same warp as the scheduler's flow_shift


def zero_init_dit_outputs(transformer) -> None:
    """Zero every block's attention and FFN output projections and the final projection: each
    block starts as the identity and the model at zero velocity (DiT's adaLN-zero idea; Wan's
    modulation table is shared, so the projections are what can be zeroed)."""
    for block in transformer.blocks:
        for layer in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn.net[-1]):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    torch.nn.init.zeros_(transformer.proj_out.weight)
    torch.nn.init.zeros_(transformer.proj_out.bias)


def train_dit(transformer, text_encoder, tokenizer, latents, spec_idx, cover, args, device, gen, autocast):
    if args.dit_zero_init:
        zero_init_dit_outputs(transformer)
    if args.dit_pad_init:
        init_attention_past_padding(transformer, torch.Generator().manual_seed(args.seed + 2))
    transformer.train()
    text_encoder.train()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt_kwargs = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(params, lr=args.dit_lr, betas=(0.9, 0.99), weight_decay=0.01, **opt_kwargs)
    ema = [p.detach().clone().float() for p in params]
    # token table: one row per spec combination, last row = the empty (dropped) caption
    all_specs = data.all_specs()
    ids, mask = caption_tokens(tokenizer, [data.caption(s) for s in all_specs] + [""], device)
    row = torch.tensor([data.spec_index(s) for s in all_specs], device=device)
    sizes = torch.tensor([len(data.SHAPES), len(data.COLOUR_NAMES), len(data.MOTIONS), len(data.BACKGROUNDS)])
    strides = torch.tensor([sizes[1:].prod(), sizes[2:].prod(), sizes[3:].prod(), 1], device=device)
    assert torch.equal((row * strides).sum(1), torch.arange(len(all_specs), device=device))
    spec_row = (spec_idx.to(device) * strides).sum(1)
    forward = transformer
    with folded_text_padding(transformer) as text_len:
        if args.compile:
            # fuses Wan's many fp32 elementwise ops (modulation, norms); eager if it fails
            forward = torch.compile(transformer)
        budget = Budget(args.minutes_dit, args.dit_steps, args.max_steps)
        step, hist, n = 0, [], latents.shape[0]
        mix = args.dit_mix or [(latents.shape[2], args.dit_batch, 1.0)]
        if max(k for k, _, _ in mix) > latents.shape[2]:
            raise ValueError(f"dit_mix asks for more latent frames than the clips have ({latents.shape[2]})")
        cum_p = torch.tensor([p for _, _, p in mix]).cumsum(0)
        while not budget.done(step):
            u = torch.rand(1, generator=gen, device=device).item()
            frames, batch, _ = mix[min(int((cum_p < u).sum()), len(mix) - 1)]
            pick = torch.randint(n, (batch,), generator=gen, device=device)
            # The VAE is causal, so the first k latent frames of a clip are exactly the latents
            # of its first 4k - 3 frames: a shorter clip from the same distribution, far cheaper.
            x0 = latents[pick, :, :frames].float()
            # like the VAE's fg weight: the shape is a few percent of the tokens but all of the prompt
            weight = 1 + args.dit_fg_weight * cover[pick, :, :frames].float()
            weight = weight / weight.mean()
            rows = spec_row[pick]
            drop = torch.rand(batch, generator=gen, device=device) < args.caption_dropout
            rows = torch.where(drop, torch.full_like(rows, len(all_specs)), rows)
            sigma = shifted_sigmas(batch, args.flow_shift, gen, device)
            noise = torch.randn(x0.shape, generator=gen, device=device)
            s = sigma.view(-1, 1, 1, 1, 1)
            x_t = (1 - s) * x0 + s * noise
            for group in opt.param_groups:
                group["lr"] = lr_at(step, budget.total, args.dit_lr, args.warmup)
            with autocast():
                text = encode_text(text_encoder, ids[rows], mask[rows], text_len)
                try:
                    pred = forward(x_t, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False)[0]
                except Exception as e:  # noqa: BLE001 - compilation problems only; eager is always correct
                    if forward is transformer:
                        raise
                    log(f"  torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running eager")
                    forward = transformer
                    pred = forward(x_t, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False)[0]
            loss = ((pred.float() - (noise - x0)).pow(2) * weight).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            budget.plan(step + 1, device)
            # EMA horizon: at most ~10% of the planned run (and short while warming up)
            decay = min(args.ema, (1 + step) / (10 + step), 1 - 10 / max(10, min(budget.total, 10**6)))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - decay)
            if step % 10 == 0:
                hist.append(loss.item())
            if step % args.log_every == 0:
                log(f"dit step {step}/{budget.total} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e}")
            step += 1
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e.to(p.dtype))
    transformer.eval()
    text_encoder.eval()
    last = hist[-10:] or [float("nan")]
    return {"steps": step, "seconds": round(time.time() - budget.start, 1),
            "final_loss": sum(last) / len(last), "loss_curve": hist[:: max(1, len(hist) // 50)]}


def load_trained_vae(path: str, config: ReferenceConfig, device):
    """The VAE of a ``--stop-after vae`` run and its stage-1 log entry."""
    from diffusers import AutoencoderKLWan

    run_dir = os.path.dirname(path.rstrip("/")) if os.path.basename(path.rstrip("/")) == "vae" else path
    vae_dir = os.path.join(run_dir, "vae")
    if not os.path.isfile(os.path.join(vae_dir, "config.json")):
        raise FileNotFoundError(f"vae_from: no saved VAE at {vae_dir} (write one with --stop-after vae)")
    vae = AutoencoderKLWan.from_pretrained(vae_dir).to(device).eval()
    differ = {k: (vae.config.get(k), v) for k, v in vae_layout(config).items() if vae.config.get(k) != v}
    if differ:
        raise ValueError("vae_from: the saved VAE does not fit this run's config (saved, wanted): "
                         + ", ".join(f"{k}={got!r} vs {want!r}" for k, (got, want) in differ.items()))
    entry = {}
    log_path = os.path.join(run_dir, "train_log.json")
    if os.path.isfile(log_path):
        with open(log_path) as f:
            stage1 = json.load(f)
        entry = {k: v for k, v in stage1.get("vae", {}).items()
                 if k not in ("heldout_psnr_db", "single_pass_gap", "judge_on_reconstructions")}
        entry.update(command=stage1.get("command"), seed=stage1.get("seed"), device=stage1.get("device"))
    return vae, {**entry, "loaded_from": path}


def load_trained_dit(path: str, config: ReferenceConfig, device) -> tuple[dict, dict]:
    """The VAE, text encoder and transformer of a saved pipeline (``--dit-from``), to train on."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    vae, _ = load_trained_vae(path, config, device)
    if not vae.config.get("latents_mean"):
        raise ValueError(f"dit_from: the VAE at {path} has no latents_mean/latents_std (not a finished run)")
    comps = {"vae": vae,
             "text_encoder": UMT5EncoderModel.from_pretrained(os.path.join(path, "text_encoder")).to(device),
             "transformer": WanTransformer3DModel.from_pretrained(os.path.join(path, "transformer")).to(device)}
    entry = {"loaded_from": path}
    log_path = os.path.join(path, "train_log.json")
    if os.path.isfile(log_path):
        with open(log_path) as f:
            before = json.load(f)
        dit = before.get("dit", {})  # a continued run logs its running total
        entry.update(command=before.get("command"), seed=before.get("seed"),
                     steps_before=dit.get("steps_total", dit.get("steps")))
    return comps, entry


def write_log(out: str, result: dict, t0: float) -> None:
    result["wall_seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump(result, f, indent=2)


def dir_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 2**20


def parse_mix(text: str) -> list[tuple[int, int, float]]:
    try:
        mix = [(int(k), int(b), float(p)) for k, b, p in (part.split(":") for part in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"dit_mix must look like 1:64:0.5,8:8:0.5, got {text!r}") from None
    if any(k < 1 or b < 1 or p <= 0 for k, b, p in mix) or abs(sum(p for _, _, p in mix) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"dit_mix needs K, B >= 1 and probabilities summing to 1, got {text!r}")
    return mix


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train the reference text-to-video model (WanPipeline).")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=integer(1), help="CPU threads (default: the cores not already busy)")
    ap.add_argument("--seed", type=int, default=0)
    # The DiT loss flattens after ~2000 steps (~100 s compiled on an H100), while the VAE was
    # still improving fast when its budget ran out: the VAE gets the larger share.
    ap.add_argument("--minutes-vae", type=float, default=3.5)
    ap.add_argument("--minutes-dit", type=float, default=3.5)
    ap.add_argument("--vae-steps", type=int, default=None, help="fixed VAE steps (overrides the budget)")
    ap.add_argument("--dit-steps", type=int, default=None, help="fixed DiT steps (overrides the budget)")
    ap.add_argument("--max-steps", type=int, default=None, help="cap on every stage (smoke tests)")
    ap.add_argument("--vae-batch", type=int, default=16)
    # 9 frames = the first frame plus two cached chunks, the shortest clip in which every
    # causal-cache path of the encoder and decoder occurs: measured to generalise to 29-frame
    # clips in a CPU probe (5-frame clips, also cropped, did not), at a third of the cost.
    ap.add_argument("--vae-frames", type=int, default=None,
                    help="VAE training clip length, 1 + 4k (default: 9, or --num-frames if shorter)")
    ap.add_argument("--vae-crop", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="train the VAE on random crops of this size (default: full frames; crops "
                         "change what the mid-block attention sees and generalised worse in a CPU probe)")
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--vae-zero-init", action=argparse.BooleanOptionalAction, default=True,
                    help="start the VAE's residual branches at zero (see build.zero_init_residual_branches)")
    ap.add_argument("--fg-weight", type=float, default=4.0, help="extra loss weight on shape pixels")
    ap.add_argument("--kl-weight", type=float, default=1e-6, help="on the per-element mean KL")
    ap.add_argument("--dataset-clips", type=int, default=16384)
    ap.add_argument("--encode-batch", type=int, default=128)
    ap.add_argument("--dit-batch", type=int, default=128)
    ap.add_argument("--dit-mix", type=parse_mix, default=None, metavar="K:B:P,...",
                    help="mixed clip lengths: with probability P a step trains on the first K latent "
                         "frames with batch B (default: full clips, --dit-batch)")
    ap.add_argument("--dit-lr", type=float, default=8e-4)
    ap.add_argument("--dit-fg-weight", type=float, default=4.0, help="extra loss weight on shape tokens")
    ap.add_argument("--dit-zero-init", action=argparse.BooleanOptionalAction, default=True,
                    help="start every transformer block as the identity (zero output projections)")
    ap.add_argument("--dit-pad-init", action=argparse.BooleanOptionalAction, default=False,
                    help="start cross-attention past the prompt's zero padding (text.init_attention_past_padding); "
                         "off: the shipped weights were trained without it")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--eval-prompts", type=int, default=len(data.held_out_specs()), help="0 disables")
    ap.add_argument("--eval-steps", type=int, default=REFERENCE_DEFAULTS["num_inference_steps"])
    ap.add_argument("--eval-guidance", type=float, nargs="+", default=[1.0, REFERENCE_DEFAULTS["guidance_scale"]])
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--samples", default=None, help="write the held-out generations here (.npz, uint8)")
    ap.add_argument("--num-frames", type=int, default=data.NUM_FRAMES)
    ap.add_argument("--height", type=int, default=data.HEIGHT)
    ap.add_argument("--width", type=int, default=data.WIDTH)
    ap.add_argument("--config", default=None, help="JSON of ReferenceConfig overrides")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the transformer (default: on for cuda)")
    ap.add_argument("--log-every", type=int, default=100)
    # Resumable in two halves (one device call each, or VAE on a GPU and the rest elsewhere):
    # --stop-after vae writes OUT/vae and train_log.json; --vae-from OUT picks up from there.
    ap.add_argument("--stop-after", choices=["vae"], default=None, help="save the VAE and stop")
    ap.add_argument("--vae-from", default=None,
                    help="skip stage 1: load the VAE saved by --stop-after vae (a run directory or its vae/)")
    # Longer runs in pieces: each piece is one command within a wall budget; a new --seed draws
    # a fresh dataset and noise, and the learning rate warms up again (optimizer state is not kept).
    ap.add_argument("--dit-from", default=None,
                    help="continue stage 3 from a saved pipeline (its VAE with its latent statistics, text "
                         "encoder and transformer); stages 1 and the initialisations are skipped")
    return ap


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    t0 = time.time()
    device = torch.device(args.device)
    if args.compile is None:
        args.compile = device.type == "cuda"
    args.vae_frames = args.vae_frames or min(9, args.num_frames)
    if args.vae_frames < 1 or (args.vae_frames - 1) % 4:
        raise ValueError(f"vae_frames must be 1 + 4k (the VAE's chunking), got {args.vae_frames}")
    if args.vae_crop and (args.vae_crop[0] <= 0 or args.vae_crop[0] >= args.height
                          or args.vae_crop[1] >= args.width):
        args.vae_crop = None  # crops only when smaller than the frame
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # the VAE's conv3d shapes repeat every step
    overrides = json.loads(args.config) if args.config else {}
    config = ReferenceConfig(**overrides)
    args.flow_shift = config.flow_shift
    comps = build_components(config)
    for name in ("vae", "text_encoder", "transformer"):
        comps[name].to(device)
    sizes = {k: count_params(comps[k]) for k in ("vae", "text_encoder", "transformer")}
    log(f"device {device}, params {sizes}, latent grid "
        f"{(args.num_frames - 1) // 4 + 1}x{args.height // config.spatial_factor}x{args.width // config.spatial_factor}")
    bf16 = device.type == "cuda"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    gen = torch.Generator().manual_seed(args.seed)                       # clip jitter + specs (CPU)
    dev_gen = torch.Generator(device).manual_seed(args.seed + 1)         # noise, sigmas, batches
    result = {"command": " ".join([os.path.basename(sys.executable), "-m", "accel.pipelines.reference.train"]
                                  + (argv if argv is not None else sys.argv[1:])),
              "seed": args.seed, "device": torch.cuda.get_device_name(device) if bf16 else "cpu",
              "versions": {"torch": torch.__version__}, "config": config.to_dict(), "params": sizes,
              "video": {"num_frames": args.num_frames, "height": args.height, "width": args.width}}
    import diffusers
    import transformers
    result["versions"].update(diffusers=diffusers.__version__, transformers=transformers.__version__)

    if args.dit_from and (args.vae_from or args.stop_after):
        raise ValueError("dit_from continues from a finished run: it takes neither vae_from nor stop_after")
    if args.dit_from:
        loaded, result["dit_from"] = load_trained_dit(args.dit_from, config, device)
        comps.update(loaded)
        args.dit_zero_init = args.dit_pad_init = False  # initialisations are for a fresh transformer
        result["vae"] = {"loaded_from": args.dit_from}
        log(f"stages 1 and 3 continue from {args.dit_from} ({result['dit_from'].get('steps_before')} DiT steps)")
    elif args.vae_from:
        comps["vae"], result["vae"] = load_trained_vae(args.vae_from, config, device)
        log(f"stage 1: VAE loaded from {args.vae_from}")
    else:
        log("stage 1: VAE")
        result["vae"] = train_vae(comps["vae"], args, device, gen, dev_gen, autocast)
    result["vae"].update(vae_check(comps["vae"], args, device, gen, autocast))
    log(f"  VAE {result['vae']}")
    if args.stop_after == "vae":
        comps["vae"].to("cpu").save_pretrained(os.path.join(args.out, "vae"), safe_serialization=True)
        write_log(args.out, result, t0)
        log(f"saved the VAE to {args.out}/vae; resume with --vae-from {args.out}")
        return result

    log("stage 2: encode dataset")
    t = time.time()
    latents, spec_idx, cover = encode_dataset(comps["vae"], args, device, gen, autocast)
    if args.dit_from:  # the transformer was trained on this normalisation: keep it
        mean, std = (torch.tensor(comps["vae"].config[k], device=latents.device)
                     for k in ("latents_mean", "latents_std"))
    else:
        flat = latents.float().transpose(0, 1).reshape(latents.shape[1], -1)
        mean, std = flat.mean(1), flat.std(1).clamp(min=1e-4)
        del flat
        comps["vae"].register_to_config(latents_mean=[round(float(v), 5) for v in mean],
                                        latents_std=[round(float(v), 5) for v in std])
    shape = (1, -1, 1, 1, 1)
    latents = ((latents.float() - mean.view(shape)) / std.view(shape)).to(latents.dtype)
    result["dataset"] = {"clips": int(latents.shape[0]), "latent_shape": list(latents.shape[1:]),
                         "seconds": round(time.time() - t, 1),
                         "latents_mean": comps["vae"].config.latents_mean,
                         "latents_std": comps["vae"].config.latents_std}
    log(f"  {result['dataset']['clips']} clips -> latents {tuple(latents.shape[1:])} in {time.time() - t:.1f}s")

    log("stage 3: text encoder + transformer (flow matching)")
    result["dit"] = train_dit(comps["transformer"], comps["text_encoder"], comps["tokenizer"], latents,
                              spec_idx, cover, args, device, dev_gen, autocast)
    result["dit"]["steps_total"] = result["dit"]["steps"] + (result.get("dit_from", {}).get("steps_before") or 0)
    log(f"  DiT steps {result['dit']['steps']} final loss {result['dit']['final_loss']:.4f}")
    del latents

    from diffusers import WanPipeline

    pipe = WanPipeline(**comps)
    pipe.to("cpu").save_pretrained(args.out, safe_serialization=True)
    result["saved_mb"] = round(dir_mb(args.out), 2)
    log(f"saved pipeline to {args.out} ({result['saved_mb']} MB)")
    write_log(args.out, result, t0)  # kept even if the evaluation below fails
    if args.eval_prompts > 0:
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        t = time.time()
        from accel.pipelines.reference.evaluate import heldout_report

        result["heldout_eval"] = heldout_report(
            pipe, data.held_out_specs()[: args.eval_prompts], args.eval_guidance, args.eval_steps,
            args.eval_batch, args.samples, log=log, height=args.height, width=args.width,
            num_frames=args.num_frames)
        result["heldout_eval"]["seconds"] = round(time.time() - t, 1)
    write_log(args.out, result, t0)
    log(f"done in {result['wall_seconds']}s")
    return result


if __name__ == "__main__":
    main()
