"""``ttt-video`` command line: ``ttt-video generate --storyboard FILE --out video.mp4`` and friends.

Subcommands live in a registry (``register_command``) so other parts of the project (data preparation,
training, scoring) add theirs without touching this file: a module listed in ``PLUGIN_MODULES`` that
imports cleanly registers its commands at import time.

Also runnable as ``python -m ttt_video.ttt_core.cli``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Callable

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class Command:
    name: str
    help: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
# Optional modules that register more subcommands (prepare / train / score come from other issues).
# Names are relative to this package (ttt_core), so they resolve however the pack was imported.
PLUGIN_MODULES = (
    ".training.cli",
    ".toyworld.cli",
)


def register_command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int], description: str | None = None) -> None:
    """Add a ``ttt-video <name>`` subcommand (configure adds arguments; run returns the exit code)."""
    COMMANDS[name] = Command(name, help, description or help, configure, run)


# --------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------
GENERATE_DESCRIPTION = """\
Render a storyboard into a video: one 3-second segment per paragraph (Format 3 text) or per segment
object (official JSON / JSONL), 16 fps. 21 segments = 1,009 frames = 63 s.

With no --model the embedded default model is used: a small TTT-DiT trained on the toy cat-and-mouse
world (docs/toyworld.md) that runs on a CPU in minutes; it draws only that world, from storyboards in its
vocabulary (storyboards/one_minute.txt), and is still an early, weak model (docs/results.md). Bring a
fine-tuned CogVideoX / TTT model for real videos (--model FOLDER, optionally --ttt-weights FILE).

Ctrl-C stops within one sampling step and leaves a resumable checkpoint (<out>.resume.safetensors); the
command to continue is printed. A resumed run gives the same video as an uninterrupted one.
"""

GENERATE_EPILOG = """\
examples:
  ttt-video generate --storyboard storyboards/one_minute.txt --out one_minute.mp4
  ttt-video generate --storyboard storyboards/preview_9s.txt --out preview.mp4 --steps 20 --seed 7
  ttt-video generate --storyboard story.json --out v.mp4 --model /models/CogVideoX-5b --ttt-weights ttt.safetensors
  # keep every segment's noise but re-roll segments 3 and 5:
  ttt-video generate --storyboard story.txt --out v2.mp4 --seed 7 --regenerate 3,5 --variation-seed 1
  # continue an interrupted run:
  ttt-video generate --resume v.mp4.resume.safetensors --out v.mp4
"""


def _segment_list(text: str) -> list[int]:
    """argparse type for '3,5-7' (see sampling.parse_segment_list)."""
    from .sampling import parse_segment_list

    try:
        return parse_segment_list(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _segment_seeds(text: str) -> dict[int, int]:
    """argparse type for '3=123,5=77' or '11,12,13' (see sampling.parse_segment_seeds)."""
    from .sampling import parse_segment_seeds

    try:
        return parse_segment_seeds(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _nonneg_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _pos_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def configure_generate(p: argparse.ArgumentParser) -> None:
    from .sampling import CFG_MODES, DEFAULT_GUIDANCE, DEFAULT_STEPS, GUIDANCE_MODES, SCHEDULERS

    io = p.add_argument_group("input / output")
    io.add_argument("--storyboard", metavar="FILE", help="storyboard: Format 3 text (.txt) or official JSON / JSONL "
                    "(required unless --resume names a checkpoint, which holds its storyboard)")
    io.add_argument("--out", metavar="VIDEO.mp4", required=True, help="output mp4 (h264, 16 fps); never overwritten "
                    "unless --overwrite; nothing is written there if the run fails")
    io.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    io.add_argument("--video-index", type=_pos_int, default=1, metavar="N",
                    help="which video of a multi-video JSON / JSONL storyboard (1-based, default 1)")

    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="DIR_OR_FILE", help="CogVideoX-style folder (transformer/, text_encoder/, "
                   "tokenizer/, vae/, scheduler/) or a single transformer .safetensors; default: the embedded "
                   "default (small toy-world model)")
    m.add_argument("--ttt-weights", metavar="FILE", help="TTT layer weights (.safetensors) loaded on top of --model")
    m.add_argument("--text-encoder", metavar="DIR", help="folder with tokenizer/ + text_encoder/ (default: --model's)")
    m.add_argument("--vae", metavar="DIR", help="folder with the CogVideoX VAE (default: --model's vae/)")
    m.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ... (default auto)")
    m.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    m.add_argument("--offload", action="store_true", help="keep models on the CPU and move each to the device only "
                   "while it runs (less GPU memory, slower)")

    s = p.add_argument_group("sampling")
    s.add_argument("--steps", type=_pos_int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS}, as the paper)")
    s.add_argument("--seed", type=int, default=0, help="seed: the same seed gives the same video on the same machine (default 0)")
    s.add_argument("--scheduler", choices=SCHEDULERS, default="dpmpp_2m",
                   help="dpmpp_2m: the official code's stochastic DPM++ 2M (default); ddim: the paper's deterministic DDIM")
    s.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance strength s (default {DEFAULT_GUIDANCE:g}, the official value)")
    s.add_argument("--guidance-mode", choices=GUIDANCE_MODES, default="dynamic",
                   help="dynamic: w = 1 + s(1 - cos(pi (i/N)^5))/2, ramping 1 -> 1+s over the steps (default); "
                   "constant: w = s; official: the official code's formula on the DDPM timestep (a quirk, for reproduction)")
    s.add_argument("--no-negative", action="store_true", help="ignore negative prompts and guidance (one model pass per step)")
    s.add_argument("--segment-seeds", type=_segment_seeds, metavar="LIST",
                   help="per-segment noise seeds: '3=123,5=77' (segment=seed) or '11,12,13' (one per segment); "
                   "others derive from --seed")
    s.add_argument("--regenerate", type=_segment_list, default=[], metavar="SEGMENTS",
                   help="re-roll only these segments' noise, e.g. '3,5-7' (1-based); all others keep theirs. The "
                   "model is global, so kept segments may still change slightly")
    s.add_argument("--variation-seed", type=int, help="seed for --regenerate (default --seed + 1)")
    s.add_argument("--cfg", choices=CFG_MODES, default="auto", dest="cfg_mode",
                   help="prompt and negative passes batched together or one after another; auto batches and falls "
                   "back to sequential when GPU memory runs out (default auto)")
    s.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles (less GPU memory)")

    r = p.add_argument_group("interrupt / resume")
    r.add_argument("--resume", metavar="CKPT", help="continue an interrupted run from its checkpoint; sampler "
                   "settings and (without --storyboard) the storyboard come from the checkpoint")
    r.add_argument("--checkpoint", metavar="FILE", help="where an interrupted run leaves its state (default <out>.resume.safetensors)")
    r.add_argument("--checkpoint-every", type=_nonneg_int, default=0, metavar="N",
                   help="also save the state every N steps (0: only on interrupt; default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


class _Progress:
    """tqdm bars per stage (text, sampling with ETA, decoding)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int, detail=None) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        labels = {"encode": "text encoder", "sample": "sampling", "decode": "decoding"}
        bar = self.bars.get(stage)
        if bar is None:
            bar = tqdm(total=total, desc=labels.get(stage, stage), unit="step" if stage == "sample" else "it",
                       dynamic_ncols=True, initial=0)
            self.bars[stage] = bar
        if detail is not None and hasattr(detail, "guidance"):
            bar.set_postfix_str(f"t={detail.timestep} w={detail.guidance:.2f}")
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    def close(self):
        for bar in self.bars.values():
            bar.close()


def _resume_command(args: argparse.Namespace, ckpt: str) -> str:
    cmd = ["ttt-video", "generate", "--resume", ckpt, "--out", args.out]
    for flag, val in (("--model", args.model), ("--ttt-weights", args.ttt_weights),
                      ("--text-encoder", args.text_encoder), ("--vae", args.vae)):
        if val:
            cmd += [flag, val]
    if args.device != "auto":
        cmd += ["--device", args.device]
    if args.overwrite:
        cmd.append("--overwrite")
    return " ".join(shlex.quote(c) for c in cmd)


def run_generate(args: argparse.Namespace) -> int:
    from . import pipeline
    from .sampling import SamplingInterrupted
    from .storyboard import StoryboardError, load_storyboard

    if not args.storyboard and not args.resume:
        print("ttt-video generate: error: --storyboard FILE is required (or --resume CKPT)", file=sys.stderr)
        return EXIT_USAGE
    if args.resume and not (args.model or args.ttt_weights):
        # The checkpoint remembers which model made it.
        from .sampling import read_checkpoint_meta

        try:
            extra = read_checkpoint_meta(args.resume).get("extra", {})
        except (OSError, ValueError) as e:
            print(f"ttt-video generate: error: {e}", file=sys.stderr)
            return EXIT_ERROR
        for key in ("model", "ttt_weights", "text_encoder", "vae"):
            if getattr(args, key) is None and extra.get(f"{key}_path"):
                setattr(args, key, extra[f"{key}_path"])
    progress = _Progress(not args.quiet)
    ckpt = args.checkpoint or pipeline.default_checkpoint_path(args.out)
    if not args.resume and os.path.exists(ckpt):
        print(f"note: {ckpt} holds an interrupted run of this video; this fresh run replaces it if interrupted. To "
              f"continue it instead: {_resume_command(args, ckpt)}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        sb = load_storyboard(args.storyboard, video_index=args.video_index - 1) if args.storyboard else None
        if sb is not None and not args.quiet:
            print(f"storyboard: {sb.summary()}", file=sys.stderr)
        if args.model is None and not args.ttt_weights and not args.quiet:
            print(f"model: {pipeline.EMBEDDED_DEFAULT_NAME} -- {pipeline.EMBEDDED_DEFAULT_NOTE}", file=sys.stderr)
        result = pipeline.generate(
            sb, args.out, model=args.model, ttt_weights=args.ttt_weights, text_encoder=args.text_encoder, vae=args.vae,
            steps=args.steps, seed=args.seed, guidance=args.guidance, guidance_mode=args.guidance_mode,
            scheduler=args.scheduler, segment_seeds=args.segment_seeds, regenerate=args.regenerate,
            variation_seed=args.variation_seed, use_negative=not args.no_negative, cfg_mode=args.cfg_mode,
            device=args.device, dtype=args.dtype, offload=args.offload, vae_tiling=args.vae_tiling,
            overwrite=args.overwrite, checkpoint_path=ckpt, checkpoint_every=args.checkpoint_every,
            resume=args.resume, progress=progress,
        )
    except SamplingInterrupted as e:
        progress.close()
        print(f"\ninterrupted before step {e.step + 1} of {e.total}; nothing written to {args.out}", file=sys.stderr)
        if e.checkpoint_path:
            print(f"state saved to {e.checkpoint_path}; resume with:\n  {_resume_command(args, e.checkpoint_path)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        progress.close()
        print(f"\ninterrupted; nothing written to {args.out}", file=sys.stderr)
        if os.path.exists(ckpt):
            print(f"a checkpoint exists: {ckpt}; resume with:\n  {_resume_command(args, ckpt)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (StoryboardError, FileExistsError, FileNotFoundError, pipeline.PipelineError, ValueError) as e:
        progress.close()
        print(f"ttt-video generate: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    progress.close()
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {result.summary()} (total {time.perf_counter() - t0:.1f} s)")
    return EXIT_OK


register_command("generate", "render a storyboard into a video (mp4)", configure_generate, run_generate,
                 description=GENERATE_DESCRIPTION)


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------
def _load_plugins() -> None:
    base = __package__ or "ttt_video.ttt_core"
    for mod in PLUGIN_MODULES:
        full = importlib.util.resolve_name(mod, base)
        try:
            importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name and (full == e.name or full.startswith(e.name + ".")):
                continue  # not written yet / not installed
            raise


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(
        prog="ttt-video",
        description="One-minute video generation with Test-Time Training (CogVideoX + TTT-MLP).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in COMMANDS.values():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description,
                            epilog=GENERATE_EPILOG if cmd.name == "generate" else None,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.configure(sp)
        sp.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    # Run through the package's copy of this module: plugin modules register their commands there (under
    # `python -m` this file is also loaded as __main__, a second module object with its own registry).
    from ttt_video.ttt_core.cli import main as _package_main

    raise SystemExit(_package_main())
