"""``ttt-video prepare`` and ``ttt-video train`` (registered into ttt_core.cli's command registry).

Standalone (what torchrun runs):
    python -m ttt_video.ttt_core.training.cli train --config configs/tiny/3s.toml
    torchrun --nproc-per-node 8 -m ttt_video.ttt_core.training.cli train --config configs/cogvideox-5b/9s.toml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .data import atomic_write_text

PREPARE_DESCRIPTION = """\
Turn videos + per-3-s-segment annotations into training data: cut each clip into whole 3-s segments at
16 fps, resize / centre-crop to the model's pixel size, VAE-encode once, T5-encode each segment's text once,
and write safetensors files plus a JSONL manifest. Resumable: finished items are skipped on a re-run.
Annotation formats: our JSON (docs/training.md), the official per-video JSONL (text_0..text_n +
scene_start / scene_end lists) and the official per-clip JSON (mp4 / text / scene_start / scene_end).
"""

TRAIN_DESCRIPTION = """\
Run one context-extension stage (configs/<model>/{3s,9s,18s,30s,63s}.toml). Same command on one process
or under torchrun (FSDP2 over all processes). SIGTERM writes a checkpoint and stops; --resume continues it.
"""


def configure_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--annotations", required=True, help="annotation file (JSON / JSONL, see docs/training.md)")
    p.add_argument("--videos", default=None, help="folder the annotation's video paths are relative to "
                   "(default: the annotation file's folder)")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder (manifest.jsonl, latents/, text/)")
    p.add_argument("--model", default=None, help="model folder with vae/, text_encoder/, tokenizer/ "
                   "(default: models/embedded-default, the tiny test assets)")  # fmt: skip
    p.add_argument("--preset", default=None, help="model preset whose pixel size / text length to use "
                   "(default: cogvideox-5b with --model, tiny without)")  # fmt: skip
    p.add_argument("--segments", type=int, default=0, help="segments per training item (1 = 3 s, 3 = 9 s, ... "
                   "21 = 63 s); each annotated clip is split into consecutive items of this length. "
                   "0 (default): one item per clip with all its segments")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--store-dtype", default="bf16", choices=["bf16", "fp32"], help="dtype of stored tensors")
    p.add_argument("--limit", type=int, default=0, help="process at most this many clips (0 = all)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="start no new clip after this many minutes "
                   "(what is done is kept; a re-run continues); 0 = no limit")  # fmt: skip
    p.add_argument("--processes", type=int, default=1, help="split the clips over this many processes (each "
                   "loads its own VAE and text encoder; one small VAE leaves a GPU mostly idle, so 4 processes "
                   "share it well); their records are merged into one manifest at the end")  # fmt: skip


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 1


def _input_errors() -> tuple[type[Exception], ...]:
    """What prepare raises for bad inputs (reported as one line, not a traceback)."""
    from .prepare import AnnotationError

    return (AnnotationError, FileNotFoundError, ValueError, RuntimeError)


def run_prepare(args: argparse.Namespace) -> int:
    if args.processes < 1:
        return _fail(ValueError(f"--processes must be >= 1, got {args.processes}"))
    if args.processes > 1:
        return _run_prepare_processes(args)
    try:
        summary = _prepare(args)
    except _input_errors() as err:
        return _fail(err)
    return 0 if summary.written + summary.already_done > 0 else 1


def _prepare_shard(args: argparse.Namespace, index: int, n: int) -> None:
    """One process of ``--processes n`` (spawned; shard 0 shows the progress bar). A bad input is one line
    and exit status 1, as in a single-process run, not a traceback per process."""
    try:
        summary = _prepare(args, shard=(index, n), progress=index == 0)
    except _input_errors() as err:
        print(f"[shard {index}/{n}] error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if index:
        print(f"[shard {index}/{n}] " + summary.text(), flush=True)


def _run_prepare_processes(args: argparse.Namespace) -> int:
    import multiprocessing

    from .prepare import merge_shard_manifests

    n = args.processes
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    procs = [ctx.Process(target=_prepare_shard, args=(args, i, n), name=f"prepare-shard-{i}") for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
    # merge even after a failure: what the other shards wrote is kept and a re-run continues from it
    total = merge_shard_manifests(args.out) if Path(args.out).is_dir() else 0
    print(f"prepare: {n} processes, manifest {Path(args.out) / 'manifest.jsonl'} lists {total} item(s)", flush=True)
    if failed:
        return _fail(RuntimeError(f"prepare process(es) {failed} of {n} failed (their errors are above); "
                                  "the items written so far are kept, run again to continue"))
    return 0 if total > 0 else 1


def _prepare(args, **kw):
    from .prepare import prepare_dataset

    return prepare_dataset(
        annotations=args.annotations,
        out=args.out,
        videos_root=args.videos,
        model_root=args.model,
        preset_name=args.preset,
        segments_per_item=args.segments,
        device=args.device,
        store_dtype=args.store_dtype,
        limit=args.limit,
        max_minutes=args.max_minutes,
        **kw,
    )


def configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="stage TOML, e.g. configs/cogvideox-5b/3s.toml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config field (repeatable), e.g. --set stage.steps=100")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in checkpoint.dir")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps in this invocation (the schedule still spans stage.steps)")
    p.add_argument("--no-final-checkpoint", action="store_true", help="do not write a checkpoint when stopping")
    p.add_argument("--summary-json", default=None, help="write the run summary (timings, memory) to this file")


def run_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import train_stage

    try:
        cfg = load_config(args.config, args.set)
        summary = train_stage(cfg, resume=args.resume, max_steps=args.max_steps, save_final=not args.no_final_checkpoint)
    except (FileNotFoundError, FileExistsError, ValueError) as err:  # config / data / folder problems
        return _fail(err)
    if args.summary_json and int(os.environ.get("RANK", "0")) == 0:
        atomic_write_text(Path(args.summary_json), json.dumps(summary, indent=1))
    return 0


def add_prepare_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("prepare", help="prepare training data (VAE latents + T5 text embeddings)",
                              description=PREPARE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    configure_prepare(p)
    p.set_defaults(_run=run_prepare)
    return p


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="run one fine-tuning stage (torchrun + FSDP2)",
                              description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    configure_train(p)
    p.set_defaults(_run=run_train)
    return p


def _register() -> None:
    try:
        from ..cli import register_command
    except ImportError:  # pragma: no cover - the main CLI is optional for torchrun use
        return
    register_command("prepare", "prepare training data (VAE latents + T5 text embeddings)", configure_prepare,
                     run_prepare, description=PREPARE_DESCRIPTION)  # fmt: skip
    register_command("train", "run one fine-tuning stage (torchrun + FSDP2)", configure_train, run_train,
                     description=TRAIN_DESCRIPTION)  # fmt: skip


_register()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ttt_video.ttt_core.training.cli")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_prepare_parser(sub)
    add_train_parser(sub)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
