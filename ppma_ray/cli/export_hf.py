"""Export a trained model as a Hugging Face transformers folder with a model card, and optionally push it.

    python jobs/export_hf.py RUN_OR_CHECKPOINT OUT_DIR [--stage mae|align] [--head NAME]
                             [--push-to-hub ORG/NAME] [--private]

RUN_OR_CHECKPOINT: the output folder of jobs/pretrain.py (its results.json names each stage's final
checkpoint; stage 2's by default), a Ray run folder (its newest whole checkpoint), or one checkpoint
folder. A stage-1 model becomes ``VideoMAEForPreTraining``, a stage-2 / fine-tuned one
``VideoMAEForVideoClassification`` with one head (``--head``: stage 2 has one per source).
OUT_DIR gets ``config.json``, ``model.safetensors`` and ``README.md``, a model card written from the
run's config and results: architecture, stages, data mix, evaluation table, and which sources
showed real people (``data.sources.<name>.humans``).

``--push-to-hub`` uploads OUT_DIR through huggingface_hub (token: ``HF_TOKEN`` or ``hf auth login``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from ppma_ray.cli import bad_input_exits, check_writable, parser
from ppma_ray.config import ConfigError
from ppma_ray.errors import one_line

HUMANS = {
    "removed": "real footage with the people removed (segmented out and inpainted)",
    "synthetic": "synthetic footage of virtual humans only",
    "none": "footage without people",
    "real": "**real footage of people**",
    "unknown": "not stated (`data.sources.<name>.humans` was not set)",
}


def find_checkpoint(source: Path, stage: str | None) -> tuple[Path, dict | None]:
    """(the checkpoint folder to export, the run's results.json or None)."""
    from ppma_ray.train.checkpoint import MODEL_FILE, run_checkpoint

    if (source / "results.json").is_file():
        try:
            results = json.loads((source / "results.json").read_text(encoding="utf-8"))
        except ValueError as e:  # cut short by a crash of an older version, or edited by hand
            raise ConfigError(f"{source / 'results.json'}: not readable JSON ({e})") from None
        stages = results.get("stages", {})
        name = stage or ("align" if "align" in stages else next(iter(stages), None))
        if name not in stages or not stages[name].get("checkpoint"):
            raise ConfigError(f"{source / 'results.json'}: no {name or 'stage'} checkpoint (stages: {sorted(stages)})")
        return Path(stages[name]["checkpoint"]), results
    if (source / MODEL_FILE).is_file():
        return source, None
    newest = run_checkpoint(source)  # none whole: a CheckpointError naming why each is not
    if newest is None:
        raise ConfigError(f"{source}: not a run output folder (results.json), a run folder or a checkpoint "
                          "(no checkpoint_* folders)")
    return newest, None


def build(checkpoint: Path, head: str | None):
    """(our model with the checkpoint's weights, strictly, its config, the stage kind, the head)."""
    from safetensors.torch import load_file

    from ppma_ray.config import PretrainConfig
    from ppma_ray.models import build_model
    from ppma_ray.schema import from_dict
    from ppma_ray.train.checkpoint import CONFIG_FILE, MODEL_FILE, checkpoint_stage

    cfg = from_dict(PretrainConfig, json.loads((checkpoint / CONFIG_FILE).read_text()))
    weights = load_file(str(checkpoint / MODEL_FILE))
    kind = checkpoint_stage(checkpoint)
    clip = cfg.data.clip
    if kind == "mae":
        model = build_model(cfg.model, "mae", img_size=clip.img_size, num_frames=clip.num_frames)
    else:
        classes = {k.split(".")[1]: v.shape[0] for k, v in weights.items() if k.startswith("heads.") and k.endswith(".weight")}
        if head is None and len(classes) > 1:
            raise ConfigError(f"--head: this model has a head per source ({', '.join(sorted(classes))}); "
                              "a transformers classifier has one: name it")
        head = head or next(iter(classes))
        if head not in classes:
            raise ConfigError(f"--head: no head {head!r} (heads: {', '.join(sorted(classes))})")
        model = build_model(cfg.model, "classifier", {head: classes[head]}, img_size=clip.img_size,
                            num_frames=clip.num_frames)
        weights = {k: v for k, v in weights.items() if not k.startswith("heads.") or k.startswith(f"heads.{head}.")}
    model.load_state_dict(weights)  # strict: every tensor (the other heads left out above), or an error
    return model.eval(), cfg, kind, head


def model_card(cfg, kind: str, head: str | None, checkpoint: Path, results: dict | None, repo: str | None) -> str:
    """README.md: what the model is, how it was trained, on what, how it scores, and how to load it."""
    import ppma_ray

    stages = ["mae", "align"] if kind == "align" else ["mae"]
    used = sorted({s for st in stages for s in getattr(cfg, st).source_names()})
    real = [s for s in used if cfg.data.sources[s].humans in ("real", "unknown")]
    cls = "VideoMAEForPreTraining" if kind == "mae" else "VideoMAEForVideoClassification"
    m, clip = cfg.model, cfg.data.clip
    tags = ["video-classification", "videomae", "ppma", "privacy-preserving", "ppma_ray"]
    lines = ["---", "library_name: transformers", *(["pipeline_tag: video-classification"] if kind != "mae" else []),
             "tags:", *[f"- {t}" for t in tags], "---", "",
             f"# {repo or cfg.run.name}", "",
             f"A video ViT pretrained with PPMA (Privacy-Preserving MAE-Align, NeurIPS 2023) by ppma_ray "
             f"{ppma_ray.__version__}: stage 1 masked-autoencoding on videos without people, "
             f"{'stage 2 aligned with action labels on those and on synthetic videos of virtual humans.' if kind == 'align' else 'exported after stage 1 (no alignment yet).'}",
             "", "## Privacy", ""]
    if real:
        lines.append(f"**Not privacy-preserving as trained:** source(s) {', '.join(real)} may show real people "
                     "(see the table). Downstream evaluation data, if any, is not part of the weights.")
    else:
        lines.append("No pretraining source showed real people. (Evaluation tasks, listed below, may; they "
                     "only measured the model and are not in its weights.)")
    lines += ["", "| source | used in | videos |", "|---|---|---|"]
    for s in used:
        lines.append(f"| {s} | {', '.join(st for st in stages if s in getattr(cfg, st).source_names())} | "
                     f"{HUMANS[cfg.data.sources[s].humans]} |")
    lines += ["", "## Model", "",
              f"`{cls}`: ViT with {m.depth} blocks, width {m.embed_dim}, {m.num_heads} heads; "
              f"{clip.num_frames}x{clip.img_size}² clips, {m.tubelet_size}x{m.patch_size}x{m.patch_size} tubelets"
              + (f"; decoder {m.decoder_depth} blocks, width {m.decoder_embed_dim}" if kind == "mae" else
                 f"; head `{head}`"),
              "", "## Training", "", "| stage | epochs | batch | samples/epoch | data mix | steps |", "|---|---|---|---|---|---|"]
    for st in stages:
        sc = getattr(cfg, st)
        mix = ", ".join(f"{k} {v:g}" for k, v in sc.mix.items())
        if sc.mix_schedule:
            mix += "; then " + "; ".join(f"epoch {e}: " + ", ".join(f"{k} {v:g}" for k, v in mx.items()) for e, mx in sc.mix_schedule)
        steps = ((results or {}).get("stages", {}).get(st) or {}).get("steps", "")
        lines.append(f"| {st} | {sc.epochs} | {sc.batch_size} | {sc.samples_per_epoch} | {mix} | {steps} |")
    evals = (results or {}).get("eval", [])
    if evals:
        lines += ["", "## Evaluation", "", "| task | protocol | top-1 | videos |", "|---|---|---|---|"]
        lines += [f"| {e['task']} | {e['protocol'].upper()} | {100 * e['top1']:.1f} | {e.get('videos', '')} |" for e in evals]
    lines += ["", "## Use", "", "```python", f"from transformers import {cls}", "",
              f'model = {cls}.from_pretrained("{repo or "PATH"}")',
              "# pixel_values: (batch, frames, 3, height, width), ImageNet-normalised", "```", "",
              f"Exported from `{checkpoint.name}` (run `{cfg.run.name}`). transformers builds `fc_norm` with LayerNorm "
              "eps 1e-5 (ppma_ray: 1e-6), a ~1e-6 relative difference in the pooled features.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, config=False, uses_ray=False)
    ap.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="pretrain output folder, Ray run folder or checkpoint folder")
    ap.add_argument("out_dir", metavar="OUT_DIR", help="the transformers folder to write")
    ap.add_argument("--stage", choices=["mae", "align"], default=None,
                    help="which stage of a pretrain output folder (default: align if it ran)")
    ap.add_argument("--head", default=None, help="the head to export as the classifier (stage 2 has one per source)")
    ap.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="also upload OUT_DIR to this Hub repository")
    ap.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    args = ap.parse_args(argv)
    from ppma_ray.models.errors import CheckpointError

    with bad_input_exits(CheckpointError, ValueError):
        if not Path(args.source).exists():
            raise ConfigError(f"RUN_OR_CHECKPOINT: {args.source} does not exist")
        if importlib.util.find_spec("transformers") is None:  # export writes transformers' own config class
            raise ConfigError("export needs transformers: pip install -e '.[hf]'")
        check_writable("OUT_DIR", args.out_dir)
        if args.push_to_hub:
            check_hub_repo(args.push_to_hub)
        checkpoint, results = find_checkpoint(Path(args.source), args.stage)
        model, cfg, kind, head = build(checkpoint, args.head)
    from ppma_ray.models.export import to_hf

    out = to_hf(model, args.out_dir)
    (out / "README.md").write_text(model_card(cfg, kind, head, checkpoint, results, args.push_to_hub))
    print(f"wrote {out} ({'VideoMAEForPreTraining' if kind == 'mae' else 'VideoMAEForVideoClassification'}, "
          f"from {checkpoint})")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        try:
            api.create_repo(args.push_to_hub, private=args.private, exist_ok=True)
            info = api.upload_folder(folder_path=str(out), repo_id=args.push_to_hub,
                                     commit_message=f"ppma_ray export of {cfg.run.name} ({checkpoint.name})")
        except Exception as e:  # offline, refused, rate-limited: whatever the Hub client raises, the export stands
            print(f"error: --push-to-hub {args.push_to_hub}: {push_error(e)} "
                  f"(the export is in {out}: push it with `hf upload {args.push_to_hub} {out}`)", file=sys.stderr)
            return 1
        print(f"pushed to https://huggingface.co/{args.push_to_hub} ({getattr(info, 'oid', info)})")
    return 0


def push_error(e: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of a failed push, and the error at the bottom of its chain where that line
    does not say it: the Hub client's requests-based versions (those transformers 4.x installs) wrap a
    refused connection in a ConnectionError of 300 characters whose reason comes last."""
    root, seen = e, {id(e)}
    while (below := root.__cause__ or root.__context__) is not None and id(below) not in seen:
        root = below
        seen.add(id(root))
    said, below = one_line(e, limit), one_line(root, limit)
    reason = below.partition(": ")[2]  # its message; empty when it has none
    if root is not e and reason and reason not in said:
        said += f" (from {below})"
    return said


def check_hub_repo(repo: str) -> None:
    """Before the export: a repository id the Hub takes, and a token to push with."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise ConfigError(f"--push-to-hub: {str(e).splitlines()[0]}") from None
    if get_token() is None:
        raise ConfigError(f"--push-to-hub {repo}: no Hub token here (set HF_TOKEN, or run `hf auth login`)")


if __name__ == "__main__":
    sys.exit(main())
