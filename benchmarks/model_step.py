"""Forward+backward time per clip of an MAE step and a fine-tuning step, side by side.

    python benchmarks/model_step.py --model vit_base [--batch 16] [--steps 3] [--grad-checkpointing] [--json OUT]

Prints FLOPs per clip (forward, multiply-add = 2), seconds per clip for both steps and their ratio
(MAE / fine-tune; about 1/5 in theory for ViT-B at 90% masking because the encoder skips masked
tokens). On CUDA the steps run under bf16 autocast at the paper's 16 clips per GPU and the MFU
against ``--peak-tflops`` is printed; on CPU the default batch is 2. ``--grad-checkpointing``
measures what activation recomputation costs. (``benchmarks/gpu_check.sh`` times the full training
step instead: optimizer, clipping and the finite check included.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppma_ray.models import create_model, flops  # noqa: E402


def time_step(model, make_loss, batch: int, steps: int, device: str) -> float:
    """Seconds per clip of forward + backward, after one warm-up step."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    for i in range(steps + 1):
        if i == 1:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with autocast:
            loss = make_loss()
        loss.backward()
        model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (steps * batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_base")
    ap.add_argument("--batch", type=int, default=None, help="clips per step (default: 16 on CUDA, 2 on CPU)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--num-frames", type=int, default=16)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.batch = args.batch or (16 if device == "cuda" else 2)
    torch.manual_seed(0)
    kw = dict(img_size=args.img_size, num_frames=args.num_frames)
    mae = create_model(args.model, "mae", **kw).to(device)
    ft = create_model(args.model, "classifier", num_classes=150, drop_path_rate=0.1, **kw).to(device)
    for m in (mae, ft):
        m.set_grad_checkpointing(args.grad_checkpointing)
    mae_fn, ft_fn = (torch.compile(mae), torch.compile(ft)) if args.compile else (mae, ft)
    x = torch.randn(args.batch, 3, args.num_frames, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 150, (args.batch,), device=device)

    mae_s = time_step(mae, lambda: mae_fn(x)[0], args.batch, args.steps, device)
    ft_s = time_step(ft, lambda: torch.nn.functional.cross_entropy(ft_fn(x), y), args.batch, args.steps, device)
    f_mae, f_ft = flops(mae), flops(ft)
    out = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": args.model, "batch": args.batch, "grad_checkpointing": args.grad_checkpointing,
        "mae_gflops_per_clip": f_mae / 1e9, "ft_gflops_per_clip": f_ft / 1e9,
        "mae_s_per_clip": mae_s, "ft_s_per_clip": ft_s,
        "mae_over_ft_time": mae_s / ft_s, "mae_over_ft_flops": f_mae / f_ft,
    }
    if device == "cuda":  # forward + backward ~ 3x forward FLOPs
        out["mae_mfu"] = 3 * f_mae / mae_s / (args.peak_tflops * 1e12)
        out["ft_mfu"] = 3 * f_ft / ft_s / (args.peak_tflops * 1e12)
    print(f"{args.model} on {out['device']}, batch {args.batch}")
    print(f"  forward GFLOPs/clip   MAE {f_mae / 1e9:8.1f}   fine-tune {f_ft / 1e9:8.1f}   ratio {f_mae / f_ft:.3f}")
    print(f"  fwd+bwd s/clip        MAE {mae_s:8.4f}   fine-tune {ft_s:8.4f}   ratio {mae_s / ft_s:.3f}")
    if device == "cuda":
        print(f"  MFU (bf16)            MAE {out['mae_mfu']:8.1%}   fine-tune {out['ft_mfu']:8.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
