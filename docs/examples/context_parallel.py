"""accel inside diffusers' context parallelism: one prompt, N processes, one video.

    torchrun --nproc_per_node=2 docs/examples/context_parallel.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers \
        --attention radial --cache fixed --out wan.mp4
    torchrun --nproc_per_node=2 docs/examples/context_parallel.py --model black-forest-labs/FLUX.1-dev \
        --attention topk --out flux.png

Each rank loads the pipeline, hands it to diffusers' own context parallelism
(``enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``) and patches it with accel;
the two calls may come in either order. ``--model tiny:wan`` / ``tiny:flux`` run the offline tiny
pipelines (random weights) for a quick look at the plumbing. Every rank prints its summary (the
counters are that rank's); rank 0 writes the output.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig, DiffusionPipeline

import accel


def load(model: str, device: torch.device):
    if model.startswith("tiny:"):
        from accel.pipelines.tiny import build_tiny_pipeline

        return build_tiny_pipeline(model.split(":", 1)[1]).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local or cached diffusers folder / hub id, or tiny:wan, tiny:flux")
    parser.add_argument("--prompt", default="a red ball bouncing on a beach")
    parser.add_argument("--attention", default=None, help="an accel attention method (accel list)")
    parser.add_argument("--cache", default=None, help="an accel cache method")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--ring", action="store_true", help="ring attention instead of Ulysses (accel's attention "
                        "then runs diffusers' own path on every call; caches still apply); needs --backend")
    parser.add_argument("--backend", default=None, help="diffusers attention backend, e.g. flash or _native_cudnn "
                        "(ring attention needs one that returns the log-sum-exp; native SDPA does not)")
    parser.add_argument("--repeats", type=int, default=1, help="calls to time (the first includes warm-up)")
    parser.add_argument("--compile", action="store_true", help="compile the transformer's repeated blocks "
                        "(compile_repeated_blocks(fullgraph=True), inductor) before the calls")
    parser.add_argument("--out", default=None, help="where rank 0 writes the video (.mp4) or image (.png)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        pipe = load(args.model, device)
        if args.backend:
            pipe.transformer.set_attention_backend(args.backend)
        if world > 1:  # diffusers asks for a degree of 2 or more; one process is the single-GPU run
            degree = {"ring_degree" if args.ring else "ulysses_degree": world}
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(**degree))
        handle = accel.patch(pipe, args.preset, attention=args.attention, cache=args.cache)
        if args.compile:  # either order works; each routed attention call is one op in the graph
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
        kwargs = {"prompt": args.prompt, "generator": torch.Generator("cpu").manual_seed(0)}
        if args.model.startswith("tiny:"):
            from accel.pipelines.tiny import tiny_call_kwargs

            kwargs = {**tiny_call_kwargs(args.model.split(":", 1)[1]), **kwargs}
            kwargs.pop("output_type")  # the pipeline's own: frames as arrays, images as PIL
        if args.steps:
            kwargs["num_inference_steps"] = args.steps
        seconds = []
        for _ in range(args.repeats):  # the first call includes warm-up
            start = time.perf_counter()
            out = pipe(**{**kwargs, "generator": torch.Generator("cpu").manual_seed(0)})  # every rank: whole output
            if cuda:
                torch.cuda.synchronize()
            seconds.append(round(time.perf_counter() - start, 3))
        print(f"[rank {rank}] wall s per call {seconds}\n{handle.summary()}", flush=True)
        if rank == 0 and args.out:
            if hasattr(out, "frames"):
                from diffusers.utils import export_to_video

                export_to_video(out.frames[0], args.out, fps=16)
            else:
                out.images[0].save(args.out)
        handle.remove()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
