"""The one prepared check for a machine with an NVIDIA GPU: is the training step, the input pipeline
and the main job ready to spend GPU hours on? Writes one JSON.

    bash benchmarks/gpu_check.sh [--dry-run] [--compile] [--cudagraphs] [--profile] [--more-batches N,..]
                                 [--videos DIR] --out DIR
                                                            (DIR/gpu_check.json)

1. ``step``: clips/s and MFU of ``train_step`` (the function every stage trains with: bf16 autocast,
   clipping, the on-device finite check, fused AdamW) for MAE and for alignment, ViT-B 16x224^2, 16
   clips per step, in-memory uint8 batches; eager, (``--compile``) torch.compile, and
   (``--cudagraphs``, MAE) torch.compile with CUDA graphs (``mode="reduce-overhead"``: a step's kernels
   replayed from one graph, without the host issuing each); and how many calls in one step made the
   host wait for the GPU (``host_syncs_per_step``, CUDA sync debug mode).
2. ``feed``: clips/s of the Ray Data pipeline on this machine's CPUs, 224^2 crops of generated
   340x256 H.264 clips, k = 4 repeated augmentations, after a warm-up pass.
3. ``step_under_feed``: the eager MAE step of 1. again, while another process keeps the feed of 2.
   running at full rate on the CPUs a training run leaves to decoding (``over_alone``: its clips/s
   over the step alone): what the decode load on the same machine takes from the step.
4. ``pretrain``: ``jobs/pretrain.py --stage mae`` with the paper's config (``ppma_vitb.yaml``) on
   one GPU and generated 224^2 footage for ``--pretrain-steps`` steps (100), as one epoch, a
   progress line every ``--pretrain-log-every`` steps (10); its lines' ``data_wait_frac`` (the share
   of step time spent waiting for input) and clips/s, means from step ``mean_from_step`` on
   (start-up left out), and ``by_line`` ([step, clips/s, data_wait_frac] per line). Set beside 1.
   and 3., the run's loop itself is what is left. Like a real run between two checkpoints (the
   paper config's come every 1,000 steps, its lines every 50), it saves one checkpoint, at its end
   (``checkpoints``): the 64 generated videos with the paper's 4 repeats made epochs of 4 steps, each
   ending in a checkpoint (1 GB with the optimizer state) that the next step's rate paid for, and a
   line per step read the GPU's values at every step.

It starts a local Ray instance, or joins the one ``RAY_ADDRESS`` names (as under ``ray job submit``).
``--dry-run`` does the same with a tiny model, 32^2 crops and few steps on the CPU (CI runs it), so
the script is known to work before anyone spends GPU time on it.

A part that fails is recorded in the JSON's ``errors`` and the others still run (a GPU machine's
time is too dear to lose the figures that did work); the script then exits 1.

* ``--profile`` also writes the top kernels of three more steps of each stage
  (``DIR/profile_mae.txt``, ``profile_align.txt``, and ``profile_mae_compiled.txt``... with ``--compile``,
  ``profile_mae_cudagraphs.txt`` with ``--cudagraphs``).
* ``--more-batches 64`` also times the step at 64 clips per step (keys ``mae_b64``...): how far the
  GPU is from full at the paper's 16.
* ``--videos DIR`` takes the generated clips (and their ``train.csv``) from DIR, writing them there
  first when DIR has none: a machine without PyAV's encoder runs the check on clips made elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppma_ray.config import ClipConfig, DecodeConfig, OptimConfig  # noqa: E402
from ppma_ray.data.manifest import write_ppma_manifest  # noqa: E402
from ppma_ray.data.pipeline import Source, build_dataset, plan_to_table  # noqa: E402
from ppma_ray.data.video import write_video  # noqa: E402
from ppma_ray.models import create_model, flops  # noqa: E402
from ppma_ray.train.checkpoint import step_seed  # noqa: E402
from ppma_ray.train.optim import build_optimizer, lr_at  # noqa: E402
from ppma_ray.train.stages import AlignLoss, mae_loss  # noqa: E402
from ppma_ray.train.step import WorkerContext, train_step  # noqa: E402

# dense bf16 peaks (TFLOP/s) by device name; others: --peak-tflops
PEAKS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}

FULL = {"model": "vit_base", "img_size": 224, "num_frames": 16, "batch": 16, "steps": 20, "short_side": 256,
        "videos": 64, "video_size": (256, 340), "video_frames": 75, "feed_passes": 24}
DRY = {"model": "vit_tiny", "img_size": 32, "num_frames": 8, "batch": 4, "steps": 3, "short_side": 36,
       "videos": 8, "video_size": (48, 64), "video_frames": 30, "feed_passes": 1}
DRY_MODEL = ["model.preset=vit_tiny", "model.depth=2", "model.decoder_depth=1", "model.decoder_embed_dim=64",
             "model.decoder_num_heads=2"]


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAKS.items() if k in name), None)


# how the step is run -> its keys' suffix in ``step`` (None: eager)
COMPILE_MODES = {None: "", "default": "_compiled", "reduce-overhead": "_cudagraphs"}


def time_step(stage: str, p: dict, device: torch.device, compile_mode: str | None, profile_to: Path | None = None,
              batch_size: int | None = None) -> dict:
    """Clips/s of ``train_step`` on one in-memory batch already on the device, after warm-up steps
    (compilation included there). ``compile_mode``: None (eager) or torch.compile's mode.
    ``profile_to``: afterwards, three more steps under ``torch.profiler``, their top operators written there.
    ``batch_size``: clips per step (default: the config's, the paper's 16 per GPU)."""
    torch.manual_seed(0)
    clip = ClipConfig(num_frames=p["num_frames"], img_size=p["img_size"], short_side=p["short_side"])
    ctx = WorkerContext(0, 1, device, clip, DecodeConfig())
    kw = {"img_size": p["img_size"], "num_frames": p["num_frames"]}
    b = batch_size or p["batch"]
    video = torch.randint(0, 255, (b, p["num_frames"], p["img_size"], p["img_size"], 3), dtype=torch.uint8)
    batch = {"video": video}
    if stage == "mae":
        model, loss_fn = create_model(p["model"], "mae", **kw), mae_loss
        optim = OptimConfig(lr=8e-4, weight_decay=0.05, betas=(0.9, 0.95))
    else:  # the recipe's stage 2: two sources with their own heads, mixup/cutmix, label smoothing, erasing
        classes = {"nohuman": 150, "synthetic": 150}
        model = create_model(p["model"], "classifier", num_classes=classes, drop_path_rate=0.1, **kw)
        loss_fn = AlignLoss(list(classes), classes, 0.1, 0.8, 1.0, 0.25, device=device)
        batch.update(label=torch.randint(0, 150, (b,)), source=torch.arange(b) % 2)
        optim = OptimConfig(lr=2e-3, weight_decay=1e-4, betas=(0.9, 0.999), layer_decay=0.75, clip_grad=None)
    # on the device before the clock starts, as the training loop has it: there the next batch arrives
    # pinned and is copied on a side stream while the current step runs (``prefetch_to_device``)
    batch = ctx.to_device(batch)
    model.to(device).train()
    if compile_mode:
        model.compile(mode=compile_mode)
    opt = build_optimizer(model, optim)
    params = [q for q in model.parameters() if q.requires_grad]
    warmup, steps = 3, p["steps"]

    def run(i: int):
        if compile_mode == "reduce-overhead":  # a new step: the graphs' output buffers may be reused
            torch.compiler.cudagraph_mark_step_begin()
        torch.manual_seed(step_seed(0, 0, i))
        return train_step(ctx, model, loss_fn, opt, params, batch, lr_at(i, warmup + steps, optim), optim.clip_grad)

    for i in range(warmup):
        run(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        result = run(i)
    taken = bool(result.taken)  # waits for the last step
    elapsed = time.perf_counter() - t0
    f = flops(model) if stage == "mae" else flops(model, num_classes=150)
    out = {"clips_per_s": steps * b / elapsed, "gflops_per_clip_fwd": f / 1e9, "steps": steps, "batch": b,
           "last_step_taken": taken, "compiled": compile_mode is not None, "compile_mode": compile_mode}
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        try:  # a figure the first GPU runs did not have: its failure must not cost the step's
            out["host_syncs_per_step"] = count_syncs(lambda: run(warmup + steps))
        except Exception as e:  # noqa: BLE001 - written into the figure
            out["host_syncs_per_step"] = f"not counted: {type(e).__name__}: {e}"
    if profile_to is not None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        else:
            # a CUDA build of torch without a driver: Kineto prints an ERROR line for the GPU count it
            # cannot read, and its start and stop markers (level USDT, 5, its highest), on every
            # profile; the CPU profile is whole. 6 is above every level Kineto prints at.
            os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        with torch.profiler.profile(activities=activities) as prof:
            for i in range(warmup + steps, warmup + steps + 3):
                last = run(i)
            bool(last.taken)  # waits for the last profiled step, so its kernels are in the table
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        profile_to.write_text(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))
    return out


def count_syncs(fn) -> int:
    """Calls in ``fn`` that make the host wait for the GPU (torch's CUDA sync debug mode, as warnings):
    the steady-state step should have none."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def make_videos(folder: Path, n: int, size: tuple[int, int], frames: int) -> Path:
    """``n`` H.264 clips of moving noise blocks (incompressible enough to cost a real decode) and a
    two-class manifest; returns the manifest."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    for i in range(n):
        base = rng.integers(0, 255, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
        video = np.empty((frames, h, w, 3), dtype=np.uint8)
        for t in range(frames):
            video[t] = np.kron(np.roll(base, t, axis=1), np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]
        write_video(folder / f"v{i:03d}.mp4", video, fps=25)
    table = pa.table({"path": [f"v{i:03d}.mp4" for i in range(n)], "label": [i % 2 for i in range(n)]})
    write_ppma_manifest(table, folder / "train.csv")
    return folder / "train.csv"


def trainer_cpus() -> float:
    """CPUs the pretrain run's training worker reserves (``scaling.cpus_per_worker``); Ray Data
    decodes on the rest."""
    return min(2, max(0.25, (os.cpu_count() or 2) / 4))


def feed_plan(manifest: Path, p: dict) -> tuple[pa.Table, ClipConfig]:
    """The feed's decode plan (every video ``feed_passes`` times) and its clip settings."""
    from ppma_ray.data.manifest import read_manifest

    table = read_manifest(manifest, root=manifest.parent)
    rows = np.tile(np.arange(table.num_rows), p["feed_passes"])
    plan = np.stack([np.zeros(len(rows), dtype=np.int64), rows], 1)
    clip = ClipConfig(num_frames=p["num_frames"], clip_seconds=2.7 if p is FULL else 1.0, img_size=p["img_size"],
                      short_side=p["short_side"])
    return plan_to_table([Source("gen", table)], plan), clip


def feed_rate(manifest: Path, p: dict, repeats: int = 4) -> dict:
    """Ray Data pipeline clips/s on all CPUs: a warm-up pass, then a timed run over every video
    ``feed_passes`` times (long enough on a many-core machine that start-up is a small share)."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    cpus = ray.cluster_resources().get("CPU", 1)
    plan_table, clip = feed_plan(manifest, p)
    decode = DecodeConfig()  # the task size training uses
    for _ in build_dataset(plan_table.slice(0, min(plan_table.num_rows, 2 * int(cpus))), clip, decode, 1, repeats).iter_batches():
        pass
    t0 = time.perf_counter()
    n = sum(int(b["ok"].sum()) for b in build_dataset(plan_table, clip, decode, 0, repeats).iter_batches(batch_format="numpy"))
    rate = n / (time.perf_counter() - t0)
    return {"clips_per_s": rate, "cpus": cpus, "repeats": repeats, "clips": n, "img_size": p["img_size"],
            "seconds": n / rate}


class FeedLoad:
    """A Ray actor that drives the feed from its own process until told to stop: the decode load
    that a training process shares its machine with, without the training process consuming it."""

    def __init__(self, plan_table: pa.Table, clip: ClipConfig, decode: DecodeConfig, repeats: int):
        import threading

        self.args = (plan_table, clip, decode, 0, repeats)
        self.warm, self.stopped = threading.Event(), threading.Event()

    def run(self) -> dict:
        """Clips/s from the first batch (decode processes busy) until ``stop``."""
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False
        n, t0 = 0, None
        while not self.stopped.is_set():  # pass after pass over the plan
            for b in build_dataset(*self.args).iter_batches(batch_format="numpy"):
                if t0 is None:
                    t0 = time.perf_counter()
                    self.warm.set()
                else:
                    n += int(b["ok"].sum())
                if self.stopped.is_set():
                    break
        return {"clips_per_s": n / (time.perf_counter() - t0), "cpus": self.args[2].cpu_limit}

    def is_warm(self) -> bool:
        return self.warm.is_set()

    def stop(self) -> None:
        self.stopped.set()


def step_under_feed(manifest: Path, p: dict, device: torch.device) -> dict:
    """The eager MAE step timed as in ``time_step`` while another process keeps the Ray Data feed
    running on the CPUs a training run leaves to decoding (all but ``trainer_cpus``), at full rate.
    Set beside the step alone, it says how much of a run's speed the decode load takes from a
    host-bound step (shared cores, memory bandwidth, clock), apart from anything in the run's loop."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    decode = DecodeConfig(cpu_limit=max(1.0, cpus - trainer_cpus()))
    load = ray.remote(num_cpus=0, max_concurrency=2)(FeedLoad).remote(*feed_plan(manifest, p), decode, 4)
    running = load.run.remote()
    deadline = time.perf_counter() + 300
    while not ray.get(load.is_warm.remote()):
        if ray.wait([running], timeout=0)[0]:
            ray.get(running)  # it ended before its first batch: raises its error
            raise RuntimeError("the feed ended before its first batch")
        if time.perf_counter() > deadline:
            raise TimeoutError("the feed gave no batch in 300 s")
        time.sleep(0.2)
    try:
        out = time_step("mae", p, device, None)
    finally:
        ray.get(load.stop.remote())
        feed = ray.get(running, timeout=300)  # the pass in flight ends at its next batch
        ray.kill(load)
    return {**out, "feed": feed}


def pretrain_run(manifest: Path, out: Path, p: dict, steps: int, log_every: int, dry: bool) -> dict:
    """``jobs/pretrain.py --stage mae`` on the paper's config (one GPU), one epoch of ``steps`` steps,
    the progress lines read back."""
    sets = [f"data.sources.nohuman.manifest={manifest}", f"data.sources.nohuman.root={manifest.parent}",
            "data.sources.nohuman.val_manifest=null", "data.sources.nohuman.fps=null",
            f"data.sources.synthetic.manifest={manifest}", f"data.sources.synthetic.root={manifest.parent}",
            "data.sources.synthetic.val_manifest=null",
            f"run.storage_path={out / 'runs'}", "run.name=gpu_check", f"run.max_steps={steps}", f"run.log_every={log_every}",
            "run.checkpoint_every=0", "run.max_failures=0", "scaling.num_workers=1",
            f"scaling.cpus_per_worker={trainer_cpus()}"]
    # the paper's 16 clips per GPU (dry: 4); the run one epoch long, so that its one checkpoint is at its end
    sets += [f"mae.batch_size={p['batch']}", f"mae.samples_per_epoch={steps * p['batch']}"]
    if dry:
        sets += DRY_MODEL + ["scaling.use_gpu=false", "scaling.torch_threads=1",
                             f"data.clip.img_size={p['img_size']}", f"data.clip.short_side={p['short_side']}",
                             f"data.clip.num_frames={p['num_frames']}", "data.clip.clip_seconds=1.0"]
    cmd = [sys.executable, str(ROOT / "jobs/pretrain.py"), "--config", str(ROOT / "jobs/configs/ppma_vitb.yaml"),
           "--stage", "mae", *[a for s in sets for a in ("--set", s)]]
    # the job joins the Ray instance this check started (as under ``ray job submit``): one set of
    # Ray processes for the whole check
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    wall = time.perf_counter() - t0
    run = out / "runs/gpu_check-mae"
    lines = [json.loads(x) for x in (run / "mae_metrics.jsonl").read_text().splitlines()] \
        if (run / "mae_metrics.jsonl").is_file() else []
    progress = [m for m in lines if "loss" in m]
    # the first steps include start-up (decode processes importing, the allocator growing): the
    # means leave out the lines of the first tenth of the steps (at least one line, at most ten steps)
    skip = -(-min(10, max(1, steps // 10)) // log_every) * log_every
    steady = [m for m in progress if m["step"] > skip]
    result = {"returncode": r.returncode, "wall_s": wall, "steps": progress[-1]["step"] if progress else 0,
              "log_every": log_every, "mean_from_step": skip + 1,
              "checkpoints": len([c for c in run.glob("checkpoint_*") if c.is_dir()])}
    if steady:
        result["data_wait_frac"] = sum(m["data_wait_frac"] for m in steady) / len(steady)
        result["clips_per_s"] = sum(m["clips_per_s"] for m in steady) / len(steady)
    # line by line: a slow start, a slow tail and a steady gap to the ``step`` figure look alike in a mean
    result["by_line"] = [[m["step"], round(m["clips_per_s"], 1), round(m["data_wait_frac"], 3)] for m in progress]
    if r.returncode:
        result["error_tail"] = (r.stdout + r.stderr)[-2000:]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for gpu_check.json")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script itself")
    ap.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    ap.add_argument("--cudagraphs", action="store_true",
                    help='also time the MAE step under torch.compile(mode="reduce-overhead") (CUDA graphs)')
    ap.add_argument("--profile", action="store_true", help="write the top operators of a few steps per stage")
    ap.add_argument("--more-batches", default="", help="also time the step at these clips per step, e.g. 64")
    ap.add_argument("--videos", type=Path, default=None,
                    help="the generated clips' folder: used when it holds train.csv, else written there")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="steps of the pretrain run (default 100; dry: 4)")
    ap.add_argument("--pretrain-log-every", type=int, default=None,
                    help="steps per progress line in the pretrain run (default 10; dry: 1)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    p = DRY if args.dry_run else FULL
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("error: no CUDA device; use --dry-run to check the script on a CPU")
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
    peak = peak_tflops(name, args.peak_tflops) if cuda else None
    report: dict = {"device": name, "dry_run": args.dry_run, "torch": torch.__version__, "peak_tflops": peak,
                    "config": {k: v for k, v in p.items() if k != "video_size"}}

    def save() -> None:
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))

    failed = []

    def part(name: str, fn):
        """Run one part; a failure is recorded under ``name`` and the next part still runs."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - reported in the JSON and by the exit code
            failed.append(name)
            report.setdefault("errors", {})[name] = {"error": f"{type(e).__name__}: {e}",
                                                     "traceback": traceback.format_exc()[-3000:]}
            print(f"{name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            save()

    def step(stage: str, mode: str | None, batch: int | None = None) -> None:
        key = stage + COMPILE_MODES[mode] + (f"_b{batch}" if batch else "")
        prof = out / f"profile_{key}.txt" if args.profile and not batch else None
        r = part(f"step.{key}", lambda: time_step(stage, p, device, mode, prof, batch))
        if r is None:
            return
        if peak:  # forward + backward ~ 3x the forward FLOPs
            r["mfu"] = 3 * r["gflops_per_clip_fwd"] * 1e9 * r["clips_per_s"] / (peak * 1e12)
        report.setdefault("step", {})[key] = r
        print(f"step {key.replace('_', ' ')}: {r['clips_per_s']:.1f} clips/s"
              + (f", MFU {r['mfu']:.1%}" if "mfu" in r else ""), flush=True)
        save()

    more = [int(b) for b in args.more_batches.split(",") if b]
    # the eager step, the feed and the pretrain run first; compilation (minutes on a GPU) last
    for batch in [None, *more]:
        step("mae", None, batch)
        step("align", None, batch)
    if cuda:
        torch.cuda.empty_cache()  # the pretrain run's worker shares the GPU with this process
    import ray

    from ppma_ray.ray_env import init_ray

    init_ray(verbose=False, log_to_driver=False)  # the console is for the figures
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        videos = args.videos.resolve() if args.videos else Path(work) / "videos"  # Ray workers run elsewhere
        manifest = videos / "train.csv"
        if not manifest.is_file():
            make_videos(videos, p["videos"], p["video_size"], p["video_frames"])
        feed = part("feed", lambda: feed_rate(manifest, p))
        if feed is not None:
            report["feed"] = feed
            print(f"feed: {feed['clips_per_s']:.1f} clips/s on {feed['cpus']:g} CPUs (k = 4)", flush=True)
            save()
        under = part("step_under_feed", lambda: step_under_feed(manifest, p, device))
        if under is not None:
            alone = report.get("step", {}).get("mae", {}).get("clips_per_s")
            under["over_alone"] = under["clips_per_s"] / alone if alone else None
            report["step_under_feed"] = under
            print(f"step mae under feed: {under['clips_per_s']:.1f} clips/s"
                  + (f" ({under['over_alone']:.2f}x the step alone)" if alone else "")
                  + f", the feed {under['feed']['clips_per_s']:.1f} clips/s on {under['feed']['cpus']:g} CPUs", flush=True)
            save()
        steps = args.pretrain_steps or (4 if args.dry_run else 100)
        log_every = args.pretrain_log_every or (1 if args.dry_run else 10)
        pre = part("pretrain", lambda: pretrain_run(manifest, Path(work), p, steps, log_every, args.dry_run))
        if pre is not None:
            report["pretrain"] = pre
            print(f"pretrain: {json.dumps({k: v for k, v in pre.items() if k != 'error_tail'})}", flush=True)
            if pre["returncode"]:
                failed.append("pretrain")
                print(pre["error_tail"], file=sys.stderr)
    ray.shutdown()
    if args.compile:
        for batch in [None, *more]:
            step("mae", "default", batch)
            step("align", "default", batch)
    if args.cudagraphs:  # MAE only: the host-bound step, the one CUDA graphs are for
        for batch in [None, *more]:
            step("mae", "reduce-overhead", batch)
    save()
    print(f"wrote {out / 'gpu_check.json'}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (their errors are in {out / 'gpu_check.json'})")


if __name__ == "__main__":
    main()
