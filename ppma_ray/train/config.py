"""Training sections of a run: the optimizer, a stage (``mae``, ``align``, ``lp``, ``ft``), scaling,
run bookkeeping and downstream evaluation; and ``RunOptions``, the rest of what a training worker
is given. Torch-free, so a config is checked in milliseconds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ppma_ray.schema import ConfigError, option

StageKind = Literal["mae", "align", "lp", "ft"]


@dataclass
class OptimConfig:
    lr: float = option(8e-4, gt=0, help="peak learning rate for the global batch (already scaled)")
    min_lr: float = option(0.0, ge=0, help="end of the cosine")
    warmup_frac: float = option(0.05, ge=0, le=1, help="fraction of the steps spent in linear warmup")
    weight_decay: float = option(0.05, ge=0, help="AdamW weight decay (none on biases, norms, tables)")
    betas: tuple[float, float] = option((0.9, 0.95), help="AdamW betas, each in [0, 1)")
    layer_decay: float | None = option(None, gt=0, le=1, help="per-block LR decay, e.g. 0.75 for stage 2 / FT")
    # timm/BEiT: head 1, block k d^(depth-k), patch embed d^(depth+1). The released code has an
    # off-by-one that multiplies every group by one more d (head and final LN at d, not 1).
    layer_decay_style: Literal["timm", "release"] = option(
        "timm", help="timm: head at 1.0 (BEiT, VideoMAE); release: every multiplier times layer_decay once more (PPMA code)")
    clip_grad: float | None = option(None, gt=0, help="gradient-norm clipping")
    # reproduce the released code's bug: the cosine starts at peak / lr_bug_scale (§7 #2); 1 = fixed
    lr_bug_scale: float = option(1.0, gt=0, help="released code's bug: the cosine starts at lr / this (1: fixed)")

    def check(self) -> None:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError.at("betas", f"each must be in [0, 1), got {list(self.betas)}")
        if self.min_lr > self.lr:
            raise ConfigError.at("min_lr", f"{self.min_lr} is above lr {self.lr}")


@dataclass
class StageConfig:
    epochs: int = option(1, ge=1, help="passes over samples_per_epoch")
    batch_size: int = option(128, ge=1, help="global batch in clips (a multiple of repeats x workers)")
    accum_steps: int = option(1, ge=1, help="micro-batches per optimizer step: the same global batch and LR with "
                                            "1/accum_steps of the activation memory")
    samples_per_epoch: int | None = option(None, ge=1, help="clips per epoch (null: the used sources' sizes)")
    repeats: int = option(1, ge=1, help="repeated augmentations per decoded video")
    mix: dict[str, float] = option(default_factory=dict, help="source name -> weight of the stage's clips")
    # [[epoch, mix], ...]: from that epoch on, ``mix`` is replaced (a PBT schedule, replayed);
    # epochs before the first entry use ``mix``
    mix_schedule: list[tuple[int, dict[str, float]]] = option(default_factory=list,
                                                              help="[[epoch, mix], ...]: the mix from that epoch on")
    granularity: Literal["sample", "batch"] = option("sample", help="mixed batches, or single-source batches (release)")
    # "weights": source k gets exactly w_k / sum(w) of the slots (the proportion Tune searches).
    # "sizes": every source with w_k > 0 gets slots in proportion to its number of videos, so an
    # epoch passes over each about once: the released code's concatenated datasets.
    mix_by: Literal["weights", "sizes"] = option("weights", help="slots per source: by the mix weights, or by the "
                                                                 "sources' sizes (release; weights > 0 only select)")
    optim: OptimConfig = field(default_factory=OptimConfig)
    drop_path_rate: float = option(0.0, ge=0, lt=1, help="stochastic depth of the last block")
    grad_checkpointing: bool = option(False, help="recompute activations in backward (saves memory)")
    # stage 2 and downstream only
    heads: Literal["separate", "shared"] = option("separate", help="one head per source, or one shared head (release)")
    label_smoothing: float = option(0.0, ge=0, lt=1, help="label smoothing of the classification loss")
    mixup_alpha: float = option(0.0, ge=0, help="Mixup Beta(alpha, alpha) (0: off)")
    cutmix_alpha: float = option(0.0, ge=0, help="CutMix Beta(alpha, alpha) (0: off)")
    randaug_ops: int = option(0, ge=0, le=14, help="RandAugment ops per clip, each applied with p 0.5 (0: off); PPMA: 4")
    randaug_magnitude: float = option(7.0, ge=0, le=10, help="RandAugment magnitude on pytorchvideo's 0-10 scale (PPMA: 7)")
    random_erase: float = option(0.0, ge=0, le=1, help="probability of erasing one box per clip (before Mixup/CutMix)")

    def check(self) -> None:
        mixes = [("mix", self.mix)] + [(f"mix_schedule[{i}]", m) for i, (_, m) in enumerate(self.mix_schedule)]
        for key, mix in mixes:
            for name, w in mix.items():
                if not w >= 0:
                    raise ConfigError.at(f"{key}.{name}", f"weight must be >= 0, got {w}")
            if mix and sum(mix.values()) <= 0:
                raise ConfigError.at(key, "at least one weight must be > 0")
        starts = [start for start, _ in self.mix_schedule]
        if any(b <= a for a, b in zip(starts, starts[1:])) or any(s < 0 for s in starts):
            raise ConfigError.at("mix_schedule", f"start epochs must be >= 0 and increasing, got {starts}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < self.batch_size:
            raise ConfigError.at("samples_per_epoch", f"{self.samples_per_epoch} clips make no step of batch_size "
                                                      f"{self.batch_size}")

    def mix_at(self, epoch: int) -> dict[str, float]:
        """The source weights of ``epoch`` (``mix``, or the schedule entry in force)."""
        current = self.mix
        for start, mix in self.mix_schedule:
            if start <= epoch:
                current = mix
        return current

    def source_names(self) -> list[str]:
        """Every source the stage names, in first-mentioned order (one head each)."""
        return list(dict.fromkeys([*self.mix, *(name for _, mix in self.mix_schedule for name in mix)]))

    def trained_sources(self) -> set[str]:
        """Sources with a positive weight in some epoch."""
        return {n for mix in [self.mix, *(m for _, m in self.mix_schedule)] for n, w in mix.items() if w > 0}


@dataclass
class ScalingSettings:
    num_workers: int = option(1, ge=1, help="Ray Train workers (one GPU each with use_gpu)")
    use_gpu: bool = option(False, help="one GPU per training worker")
    cpus_per_worker: float = option(1.0, gt=0, help="CPUs a worker reserves (fractions are fine); the rest decode")
    torch_threads: int | None = option(None, ge=1, help="CPU training: intra-op threads per worker")
    worker_resources: dict[str, float] = option(
        default_factory=dict, help="custom Ray resources each training worker requests too, e.g. {trainer: 1} "
                                   "to keep training on nodes started with --resources='{\"trainer\": N}'")
    compile: bool = option(False, help="torch.compile the model's forward (and backward) on each worker")
    compile_backend: Literal["inductor", "aot_eager"] = option(
        "inductor", help="inductor: generated kernels (the fast one); aot_eager: tracing only, for debugging")
    resource_wait_s: float = option(900.0, ge=0, help="on a cluster: how long the preflight waits for the autoscaler "
                                                      "to add the nodes the run needs (0: fail at once)")

    def worker_bundle(self) -> dict[str, float]:
        """What one training worker reserves: its CPUs, its custom resources, one GPU with use_gpu."""
        return {"CPU": self.cpus_per_worker, **self.worker_resources, **({"GPU": 1.0} if self.use_gpu else {})}


# Experiment trackers a stage can log to (``run.loggers``); train/metrics.py writes them
Logger = Literal["tensorboard", "jsonl", "wandb", "mlflow"]


@dataclass
class RunSettings:
    storage_path: str = option("runs", help="checkpoints and metrics (a path or a URI)")
    loggers: list[Logger] = option(default_factory=lambda: ["tensorboard", "jsonl"],
                                   help="where rank 0 logs each log step: tensorboard, jsonl, wandb (WANDB_* settings; "
                                        "WANDB_MODE=offline works without network), mlflow (MLFLOW_TRACKING_URI, else "
                                        "a SQLite store in the run folder)")
    name: str = option("ppma", help="run name: <storage_path>/<name>-<stage>")
    seed: int = option(0, help="seeds the model, the data plan and every step")
    checkpoint_every: int = option(0, ge=0, help="steps between checkpoints (0: end of each epoch only)")
    keep: int = option(2, ge=1, help="checkpoints kept per stage")
    checkpoint_upload: Literal["sync", "async"] = option(
        "sync", help="async: rank 0 writes each checkpoint to local disk and Ray uploads it to storage_path in the "
                     "background while training goes on (for object storage; a checkpoint counts once uploaded)")
    max_failures: int = option(0, ge=-1, help="worker restarts from the last checkpoint (-1: unlimited)")
    max_preemption_failures: int = option(-1, ge=-1, help="restarts after a node was preempted (spot reclaim, drain), "
                                                       "counted apart from max_failures (-1: unlimited)")
    log_every: int = option(10, ge=1, help="steps between progress lines")
    val_every: int = option(1, ge=1, help="epochs between stage-2 validations (the last epoch always validates)")
    max_steps: int | None = option(None, ge=1, help="stop after this many steps (the schedule still spans all epochs)")
    fail_at_step: int | None = option(None, ge=0, help="test hook: rank 0 fails once at this step")
    fail_mode: Literal["raise", "kill"] = option("raise", help="test hook: how run.fail_at_step fails: an exception, "
                                                 "or its process killed (SIGKILL, as the kernel's OOM killer does)")


@dataclass
class EvalSettings:
    """Downstream evaluation (PPMA §5). A task is ``demo:<name>``, a catalog name (``ucf101``,
    ``diving48``, ...; videos under ``task_root``), or a source name in ``data.sources``."""

    tasks: list[str] = option(default_factory=list, help="downstream tasks probed after stage 2 (demo:<name>, a catalog name, a source)")
    task_root: str | None = option(None, help="video directory of the catalog tasks")
    test_clips: int = option(2, ge=1, help="temporal views per test video")
    test_crops: int = option(3, ge=1, help="spatial views per test clip")
    # linear probe on cached features: one pass of feature extraction, then the head alone
    lp_epochs: int = option(100, ge=1, help="cached-feature probe: full-batch epochs")
    lp_lr: float = option(1.0e-2, gt=0, help="learning rate of the cached-feature linear probe")
    lp_weight_decay: float = option(1.0e-4, ge=0, help="weight decay of the cached-feature linear probe")
    compare_random_init: bool = option(True, help="the pretrain run also probes a random-init trunk")


@dataclass
class AverageSpec:
    """Learned weight averaging (LP only): the trunks of ``checkpoints`` mixed by trained coefficients."""

    checkpoints: list[str]
    per_layer: bool = False


def probe_on_cached_features(protocol: str, cache_features: bool, learned_alpha: bool, n_models: int) -> bool:
    """Whether an evaluation is the linear probe on cached features (no Ray Train run, no run folder
    to resume) rather than a probe or fine-tuning on Ray Train: a learned alpha trains with the head."""
    return protocol == "lp" and cache_features and not (learned_alpha and n_models > 1)


def coefficients(alphas: list[float] | None, n_models: int) -> list[float]:
    """The fixed averaging coefficients of ``n_models`` models: as given, one given for two (the
    first model's; the second gets 1 - alpha), or equal ones when none are given."""
    if alphas is None:
        return [1.0 / n_models] * n_models
    if len(alphas) == 1 and n_models == 2:
        return [alphas[0], 1.0 - alphas[0]]
    return list(alphas)


@dataclass
class RunOptions:
    """What the driver asks of one stage run: the worker's whole interface besides the config."""

    stage: StageKind
    run_name: str | None = None  # <storage_path>/<run_name> holds checkpoints and metrics (None: <run.name>-<stage>)
    decode_cpus: float | None = None  # Ray Data's CPU budget when data.decode.cpu_limit is unset
    init_from: str | None = None  # trunk weights to start from (stage transfer), any layout load_trunk reads
    init_partial: bool = False  # load init_from even if tensors are missing or left over (an explicit opt-in)
    resume_from: str | None = None  # another run's full state to continue (a PBT round)
    stop_epoch: int | None = None  # end after this epoch (a PBT round); schedules still span stage.epochs
    average: AverageSpec | None = None
    stop_flag: str | None = None  # the job's graceful-stop actor (train/stop.py): stop at a log step with a checkpoint


def evaluation_run_name(run_name: str, model_name: str, task: str, protocol: str) -> str:
    """The run folder of a downstream evaluation on Ray Train: ``<run.name>-<model>-<task>-<protocol>``."""
    return f"{run_name}-{model_name}-{task}-{protocol}"
