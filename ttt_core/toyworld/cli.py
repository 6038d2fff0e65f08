"""``ttt-video score`` and ``ttt-video toyworld render|dataset|storyboard`` (registered with the CLI's registry)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, register_command

SCORE_DESCRIPTION = """\
Score toy-world videos against their storyboards by reading rooms, actions, the cat's scarf and the wall
colours back from the pixels (docs/toyworld.md):
  following    room and action of every segment, and each fact where the storyboard names it;
  consistency  facts named once (the scarf in segment 1, a room's walls on the first visit) checked in
               every later segment where they should be visible; "later scenes" = only after a scene change;
  smoothness   frame pairs outside cuts whose mean change is small (no flicker or jumps).
The storyboard is a Format 3 / JSON storyboard in the toy world's language, or a ground-truth
*.events.json. With several videos a Markdown table with their mean is printed.
"""

SCORE_EPILOG = """\
examples:
  ttt-video score out.mp4 --storyboard story.txt
  ttt-video score gen/*.mp4 --storyboard-dir data/toyworld/heldout/storyboards --json > scores.json
"""

TOYWORLD_DESCRIPTION = """\
The procedural cat-and-mouse world (docs/toyworld.md):
  render      one video from a seed: VIDEO.mp4 + VIDEO.txt (storyboard) + VIDEO.events.json (ground truth)
  storyboard  print (or write) the storyboard of a seed
  dataset     training + held-out videos with annotations for `ttt-video prepare`
  eval        generate + score held-out storyboards per model: the results table (results.md / .json)
  train-vae   train the toy world's CogVideoX VAE on clips rendered on the fly (a diffusers folder)
"""


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: use HxW, e.g. 64x96") from None
    from .render import check_size

    try:
        return check_size((h, w))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _segments(text: str):
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-", 1))
            if not 1 <= lo <= hi:
                raise ValueError
            return (lo, hi)
        n = int(text)
        if n < 1:
            raise ValueError
        return n
    except ValueError:
        raise argparse.ArgumentTypeError(f"segments {text!r}: a count >= 1 (21) or a range (1-21)") from None


# --------------------------------------------------------------------------------------------------
# score
# --------------------------------------------------------------------------------------------------
def configure_score(p: argparse.ArgumentParser) -> None:
    p.epilog = SCORE_EPILOG
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="mp4 file(s) to score")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--storyboard", nargs="+", metavar="FILE",
                   help="storyboard (.txt / .json) or ground-truth .events.json: one for all videos, or one per video")
    g.add_argument("--storyboard-dir", metavar="DIR",
                   help="find each video's storyboard by name: DIR/<stem>.events.json, else DIR/<stem>.txt / .json "
                        "(also ../events/<stem>.events.json beside DIR, the dataset layout)")
    p.add_argument("--json", action="store_true", help="print the full reports as JSON (per segment and per check)")
    p.add_argument("--table", metavar="FILE.md", help="also write the Markdown table to this file (not overwritten)")


def _find_storyboard(folder: Path, stem: str) -> Path:
    candidates = [folder / f"{stem}.events.json", folder.parent / "events" / f"{stem}.events.json",
                  folder / f"{stem}.txt", folder / f"{stem}.json"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no storyboard for {stem} in {folder} (looked for {', '.join(c.name for c in candidates)})")


def run_score(args: argparse.Namespace) -> int:
    from .score import score_table, score_video, summarize

    try:
        if args.storyboard_dir:
            boards = [_find_storyboard(Path(args.storyboard_dir), Path(v).stem) for v in args.videos]
        elif len(args.storyboard) == 1:
            boards = args.storyboard * len(args.videos)
        elif len(args.storyboard) == len(args.videos):
            boards = args.storyboard
        else:
            print(f"ttt-video score: error: {len(args.videos)} video(s) but {len(args.storyboard)} storyboards "
                  "(give one for all, or one per video)", file=sys.stderr)
            return EXIT_USAGE
        if args.table and os.path.exists(args.table):
            raise FileExistsError(f"{args.table} exists; choose another --table file")
        reports = []
        for video, board in zip(args.videos, boards):
            reports.append(score_video(video, board))
            if not args.json:
                print(reports[-1].text(), flush=True)
    except (OSError, ValueError) as e:
        print(f"ttt-video score: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    table = score_table(reports)
    if args.json:
        print(json.dumps({"videos": [r.to_dict() for r in reports], "mean": summarize(reports)}, indent=1))
    elif len(reports) > 1:
        print()
        print(table)
    if args.table:
        from .dataset import _atomic_write_text

        _atomic_write_text(Path(args.table), table + "\n")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# toyworld
# --------------------------------------------------------------------------------------------------
def configure_toyworld(p: argparse.ArgumentParser) -> None:
    from .world import MAX_SCENE_SEGMENTS

    sub = p.add_subparsers(dest="toyworld_command", metavar="ACTION")
    sub.required = True
    r = sub.add_parser("render", help="render one video (+ storyboard + ground-truth events) from a seed",
                       description="Render one toy-world story: VIDEO.mp4, VIDEO.txt (Format 3 storyboard) and "
                                   "VIDEO.events.json (ground truth for `ttt-video score`).")
    r.add_argument("--seed", type=int, required=True, help="world seed (training data uses 0..999999, held-out "
                   "1000000..1099999)")
    r.add_argument("--segments", type=int, default=21, help="number of 3-s segments (default 21 = 63 s, 1,009 frames)")
    r.add_argument("--size", type=_size, default=(64, 96), help="frame size HxW, 2:3 (default 64x96)")
    r.add_argument("--out", required=True, metavar="VIDEO.mp4", help="output mp4 (storyboard and events written beside it)")
    r.add_argument("--crf", type=int, default=None, help="h264 quality (default 10, near-lossless)")
    r.add_argument("--overwrite", action="store_true", help="replace existing files")

    s = sub.add_parser("storyboard", help="print the storyboard of a seed",
                       description="Print a toy-world story's Format 3 storyboard (or its events with --events).")
    s.add_argument("--seed", type=int, required=True, help="world seed")
    s.add_argument("--segments", type=int, default=21, help="number of 3-s segments (default 21)")
    s.add_argument("--events", action="store_true", help="print the ground-truth events JSON instead")

    d = sub.add_parser("dataset", help="training + held-out videos with annotations for `ttt-video prepare`",
                       description="Write toy-world videos for training: OUT/train/annotations.json (+ videos/, "
                                   "storyboards/, events/) and, with --heldout, OUT/heldout/... from disjoint seeds. "
                                   "Re-running continues an interrupted run.")
    d.add_argument("--out", required=True, metavar="DIR", help="dataset folder")
    d.add_argument("--num", type=int, required=True, help="number of training videos")
    d.add_argument("--heldout", type=int, default=0, help="number of held-out videos (default 0)")
    d.add_argument("--seed", type=int, default=0, help="seed offset: training seeds start at it, held-out seeds at "
                   "1000000 + it (default 0)")
    d.add_argument("--segments", type=_segments, default=(1, 21),
                   help="segments per video: a count (6) or a range drawn per video (1-21, the default)")
    d.add_argument("--size", type=_size, default=(64, 96), help="frame size HxW, 2:3 (default 64x96)")
    d.add_argument("--crf", type=int, default=None, help="h264 quality (default 10)")
    d.add_argument("--workers", type=int, default=0, help="render in this many processes (default 0: in this one)")
    d.add_argument("--max-scene-segments", type=int, default=MAX_SCENE_SEGMENTS, metavar="N",
                   help="training stories' scenes last 1..N segments (default 4; smaller: more room changes); the "
                        "held-out split keeps the default")
    d.add_argument("--quiet", action="store_true", help="no progress bars")

    from .evaluate import configure_eval

    configure_eval(sub)

    from .vae_train import TRAIN_VAE_DESCRIPTION, add_train_vae_arguments

    add_train_vae_arguments(sub.add_parser("train-vae", help="train the toy world's video VAE on rendered clips",
                                           description=TRAIN_VAE_DESCRIPTION))


def run_toyworld(args: argparse.Namespace) -> int:
    if args.toyworld_command == "eval":
        from .evaluate import run_eval

        return run_eval(args)
    if args.toyworld_command == "train-vae":
        from .vae_train import run_train_vae

        return run_train_vae(args)
    from .dataset import make_dataset, render_video
    from .video_io import DEFAULT_CRF
    from .world import generate_story, storyboard_text

    try:
        if args.toyworld_command == "render":
            story = render_video(args.seed, args.segments, args.out, size=args.size,
                                 crf=DEFAULT_CRF if args.crf is None else args.crf, overwrite=args.overwrite)
            stem = os.path.splitext(args.out)[0]
            print(f"wrote {args.out} ({args.segments} segment(s), {args.size[0]}x{args.size[1]}), {stem}.txt, "
                  f"{stem}.events.json; facts: scarf {story['facts']['scarf']}, walls "
                  + ", ".join(f"{r} {c}" for r, c in story["facts"]["walls"].items()))
        elif args.toyworld_command == "storyboard":
            story = generate_story(args.seed, args.segments)
            sys.stdout.write(json.dumps(story, indent=1) + "\n" if args.events else storyboard_text(story))
        else:
            info = make_dataset(args.out, args.num, seed=args.seed, num_segments=args.segments, size=args.size,
                                heldout_videos=args.heldout, crf=DEFAULT_CRF if args.crf is None else args.crf,
                                progress=not args.quiet, workers=args.workers,
                                max_scene_segments=args.max_scene_segments)
            for split, s in info["splits"].items():  # --num 0: a held-out set alone (an eval elsewhere)
                seeds = f", seeds {s['seeds'][0]}..{s['seeds'][-1]}" if s["seeds"] else ""
                print(f"{split}: {s['videos']} video(s), {s['segments']} segment(s){seeds} -> "
                      f"{os.path.join(args.out, s['annotations'])}")
            print(f"done in {info['seconds']:.1f} s; next: ttt-video prepare --annotations "
                  f"{os.path.join(args.out, 'train', 'annotations.json')} --out <prepared folder> --segments N")
    except (OSError, ValueError) as e:
        print(f"ttt-video toyworld: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


register_command("score", "score toy-world videos against their storyboards (pixels -> story)", configure_score,
                 run_score, description=SCORE_DESCRIPTION)
register_command("toyworld", "the cat-and-mouse toy world: render videos, storyboards, datasets", configure_toyworld,
                 run_toyworld, description=TOYWORLD_DESCRIPTION)
