"""The results table of issue 6: generate held-out toy-world storyboards with each model and score them.

``evaluate_models({"ttt": DIR, "local": DIR}, "data/toyworld-63s/heldout", "eval", num=24)``:

- takes the first ``num`` held-out stories (seed order) of a split written by ``ttt-video toyworld dataset
  --heldout N``;
- loads each model once through the library pipeline (``pipeline.load_model_bundle`` + ``pipeline.generate``,
  the path ``ttt-video generate`` takes) and renders every storyboard with the sampling seed
  ``seed + world seed``: the same noise for every model, so the comparison is paired;
- writes ``out/<model>/<video>.mp4`` (atomically, by the pipeline) and ``out/<model>/<video>.score.json``
  (the scorer's full report, the seeds and the wall times);
- scores the ground-truth renders as a sanity row (~100 %) and states the chance level per metric;
- scores the ground truth passed through each distinct VAE of the models (encode, posterior mode, decode):
  the ceiling a DiT on that VAE can reach, which separates what the VAE loses from what the DiT gets wrong;
- writes ``out/results.json`` and ``out/results.md`` (means, 95 % bootstrap intervals over videos, paired
  differences between models, the command that reproduces it).

A re-run continues: a video whose mp4 and score exist is not generated again (``overwrite=True``
regenerates); a folder made with other settings is refused.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .dataset import _atomic_write_text
from .score import ScoreReport, score_video
from .world import ACTIONS, EVENTS_FORMAT

EVAL_FORMAT = "ttt-video-toyworld-eval"
EVAL_VERSION = 1
SETTINGS_NAME = "eval_settings.json"  # per model folder: what its videos were generated with
GROUND_TRUTH = "ground truth"
CHANCE = "chance"
VAE_ROW = "VAE round trip"
VAE_DIR = "vae-round-trip"  # out/<VAE_DIR>/<vae hash>/<video>.mp4 + .score.json
NUM_COLOURS = 4  # scarf and wall colours each come from 4 (world palette)
NUM_ROOMS = 4
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: the same per-video scores always give the same interval
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# (metric key, table header)
TABLE_COLUMNS = (
    ("following", "storyboard following"),
    ("room_accuracy", "room"),
    ("action_accuracy", "action"),
    ("consistency", "long-range consistency"),
    ("consistency_gap", "beyond local reach (gap)"),
    ("smoothness", "smoothness"),
)
# every scalar kept per video in results.json
VIDEO_METRICS = ("following", "room_accuracy", "action_accuracy", "stated_accuracy", "consistency",
                 "consistency_revisit", "consistency_gap", "consistency_scarf", "consistency_walls", "smoothness",
                 "mean_change")


class EvalError(ValueError):
    """Bad input for the evaluation (missing folders, too few stories, a folder made with other settings)."""


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------
def find_heldout_stories(heldout_dir, num: int) -> list[dict]:
    """The first ``num`` stories of a held-out split in world-seed order: id, seed, events, storyboard path and
    ground-truth mp4."""
    root = Path(heldout_dir)
    if not root.is_dir():
        raise EvalError(f"held-out folder {root} does not exist (give the heldout/ folder written by "
                        "`ttt-video toyworld dataset --out DATASET --heldout N`)")
    if not (root / "events").is_dir() and (root / "heldout" / "events").is_dir():
        root = root / "heldout"  # the dataset folder was given
    events_dir = root / "events"
    files = sorted(events_dir.glob("*.events.json")) if events_dir.is_dir() else []
    if not files:
        raise EvalError(f"{root} has no events/*.events.json: not a held-out split written by "
                        "`ttt-video toyworld dataset --heldout N`")
    if num < 1:
        raise EvalError(f"--num must be >= 1, got {num}")
    stories = []
    for f in files:
        try:
            events = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvalError(f"{f}: not readable events JSON ({e})") from None
        if not isinstance(events, dict) or events.get("format") != EVENTS_FORMAT or events.get("seed") is None:
            raise EvalError(f"{f}: not toy-world events (format {EVENTS_FORMAT!r} with a seed)")
        vid = f.name[: -len(".events.json")]
        stories.append({"video": vid, "world_seed": int(events["seed"]), "events": events,
                        "storyboard": root / "storyboards" / f"{vid}.txt",
                        "ground_truth": root / "videos" / f"{vid}.mp4"})
    stories.sort(key=lambda s: s["world_seed"])
    if num > len(stories):
        raise EvalError(f"asked for {num} held-out stories but {root} holds {len(stories)}; make more with "
                        f"`ttt-video toyworld dataset --out DATASET --num ... --heldout {num}` or lower --num")
    stories = stories[:num]
    for s in stories:
        for key in ("storyboard", "ground_truth"):
            if not s[key].is_file():
                raise EvalError(f"{s['video']}: {s[key]} is missing (an incomplete held-out split: re-run the "
                                "`ttt-video toyworld dataset` command that made it)")
    return stories


def check_models(models: dict) -> dict[str, Path]:
    if not models:
        raise EvalError("no models to evaluate (give --model NAME=DIR at least once)")
    out = {}
    for name, folder in models.items():
        if not _NAME_RE.match(str(name)) or str(name).lower() in (GROUND_TRUTH, CHANCE, "ground_truth", VAE_DIR):
            raise EvalError(f"model name {name!r}: use letters, digits, '_', '-', '.' (it names a folder), not a "
                            "reserved row name")
        path = Path(folder).expanduser()
        if not path.exists():
            raise EvalError(f"model folder {path} (model {name!r}) does not exist")
        out[str(name)] = path
    return out


def sample_seed(seed: int, world_seed: int) -> int:
    """The sampler seed of a story: the same for every model (paired comparison), distinct per story."""
    return int(seed) + int(world_seed)


# --------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------
def bootstrap_ci(values, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (None for fewer than 2 values)."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if len(v) < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))
    means = v[idx].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def metric_summary(values) -> dict:
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "ci95": bootstrap_ci(v), "n": len(v)}


def summarize_videos(videos: list[dict]) -> dict:
    """Per metric: mean over videos, std, 95 % bootstrap CI, n; plus pooled check counts."""
    out = {k: metric_summary(v[k] for v in videos) for k in VIDEO_METRICS}
    checks = sum(v["consistency_checks"] for v in videos)
    ok = sum(v["consistency_ok"] for v in videos)
    gap = sum(v["gap_checks"] for v in videos)
    gap_ok = sum(v["gap_ok"] for v in videos)
    out["consistency_checks"] = checks
    out["consistency_pooled"] = ok / checks if checks else None
    out["gap_checks"] = gap
    out["consistency_gap_pooled"] = gap_ok / gap if gap else None
    out["facts"] = _pool_breakdowns(videos)
    out["videos"] = len(videos)
    return out


def paired_difference(a: list[dict], b: list[dict], key: str) -> dict:
    """Mean of (a - b) over the videos where both have the metric, with a bootstrap CI of that mean."""
    diffs = [x[key] - y[key] for x, y in zip(a, b) if x[key] is not None and y[key] is not None]
    s = metric_summary(diffs)
    return {"mean": s["mean"], "ci95": s["ci95"], "n": s["n"]}


def chance_levels(stories: list[dict]) -> dict:
    """A uniform guess: 1 of 4 rooms, 1 of 6 actions, 1 of 4 colours per fact; following mixes them in the
    proportions of each story's checks. Smoothness has no chance level."""
    following = []
    for s in stories:
        segs = s["events"]["segments"]
        k = len(segs)
        stated = sum(len(seg.get("states", [])) for seg in segs)
        following.append((k / NUM_ROOMS + k / len(ACTIONS) + stated / NUM_COLOURS) / (2 * k + stated))
    return {"following": float(np.mean(following)), "room_accuracy": 1 / NUM_ROOMS,
            "action_accuracy": 1 / len(ACTIONS), "consistency": 1 / NUM_COLOURS,
            "consistency_gap": 1 / NUM_COLOURS, "smoothness": None}


# --------------------------------------------------------------------------------------------------
# per-video records
# --------------------------------------------------------------------------------------------------
# segments between a fact's naming and its check, as table columns (the last one open-ended)
DISTANCE_BUCKETS = ((1, 4), (5, 9), (10, 14), (15, None))


def _bucket(distance: int) -> str:
    for lo, hi in DISTANCE_BUCKETS:
        if hi is None or distance <= hi:
            return f"{lo}-{hi}" if hi is not None else f"{lo}+"
    raise AssertionError("unreachable")


def fact_breakdown(report: ScoreReport, story: dict) -> dict:
    """[ok, checks] counts that tell drawing from memory failures: each fact where its text names it, later by
    distance in segments, and the wrong later wall reads that are another room's colour in the same story (the
    colour is stored but tied to the wrong room) rather than a colour the story never named. Later wall checks
    in a segment the story has just entered from another room are counted apart ("entering"), with the wrong
    ones that show the previous segment's room colour: the colour carried over from where the story was."""
    stated = {fact: [0, 0] for fact in ("scarf", "walls")}
    for seg in report.segments:
        for fact in stated:
            ok = seg.get(f"stated_{fact}_ok")
            if ok is not None:
                stated[fact][0] += bool(ok)
                stated[fact][1] += 1
    later = {fact: {_bucket(lo): [0, 0] for lo, _ in DISTANCE_BUCKETS} for fact in ("scarf", "walls")}
    walls = story["events"].get("facts", {}).get("walls", {})
    rooms = [seg.get("room") for seg in report.segments]
    wrong_walls = other_room = 0
    entering, entering_wrong_previous = [0, 0], 0
    for c in report.checks:
        cell = later[c["fact"]][_bucket(c["segment"] - c["named_in_segment"])]
        cell[0] += bool(c["ok"])
        cell[1] += 1
        if c["fact"] != "walls":
            continue
        if not c["ok"]:
            wrong_walls += 1
            other_room += c["read"] is not None and c["read"] in {v for r, v in walls.items() if r != c["room"]}
        previous = rooms[c["segment"] - 1] if 0 < c["segment"] <= len(rooms) else None
        if previous is not None and previous != c["room"]:
            entering[0] += bool(c["ok"])
            entering[1] += 1
            entering_wrong_previous += not c["ok"] and c["read"] is not None and c["read"] == walls.get(previous)
    return {"stated": stated, "later": later, "walls_wrong": wrong_walls, "walls_wrong_other_room": other_room,
            "walls_entering": entering, "walls_entering_wrong_previous_room": entering_wrong_previous}


def _pool_breakdowns(rows: list[dict]) -> dict | None:
    """fact_breakdown summed over videos (None if no row has one: records from before it existed)."""
    parts = [row["facts"] for row in rows if row.get("facts")]
    if not parts:
        return None

    def add(total, part):
        if isinstance(total, dict):
            return {k: add(v, part[k]) for k, v in total.items()}
        if isinstance(total, list):
            return [a + b for a, b in zip(total, part)]
        return total + part

    pooled = copy.deepcopy(parts[0])
    for b in parts[1:]:
        pooled = add(pooled, b)
    return pooled


def video_row(report: ScoreReport, story: dict, **extra) -> dict:
    row = {"video": story["video"], "world_seed": story["world_seed"], "segments": report.num_segments}
    row.update({k: getattr(report, k) for k in VIDEO_METRICS})
    row["consistency_checks"] = report.consistency_checks
    row["consistency_ok"] = sum(bool(c["ok"]) for c in report.checks)
    row["gap_checks"] = sum(bool(c["gap"]) for c in report.checks)
    row["gap_ok"] = sum(bool(c["gap"] and c["ok"]) for c in report.checks)
    row["facts"] = fact_breakdown(report, story)
    row.update(extra)
    return row


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _generation_settings(folder: Path, heldout: Path, steps, seed, guidance, guidance_mode, scheduler,
                         use_negative) -> dict:
    return {"format": EVAL_FORMAT, "version": EVAL_VERSION, "model_folder": str(folder.resolve()),
            "heldout": str(heldout.resolve()), "steps": int(steps), "seed": int(seed), "guidance": float(guidance),
            "guidance_mode": guidance_mode, "scheduler": scheduler, "use_negative": bool(use_negative),
            "sample_seed": "seed + world seed"}


def _claim_model_folder(folder: Path, settings: dict, overwrite: bool) -> None:
    """Make ``folder`` ours for these settings; refuse a folder made with other settings or by someone else."""
    marker = folder / SETTINGS_NAME
    if marker.is_file():
        old = _read_json(marker)
        if old == settings:
            return
        if not overwrite:
            diff = [k for k in settings if not isinstance(old, dict) or old.get(k) != settings[k]]
            raise EvalError(f"{folder} holds videos made with other settings ("
                            + ", ".join(f"{k}: {old.get(k) if isinstance(old, dict) else '?'} vs {settings[k]}" for k in diff)
                            + "); use another --out or --overwrite to regenerate")
    elif folder.exists() and any(folder.iterdir()) and not overwrite:
        raise EvalError(f"{folder} exists and is not an evaluation folder (no {SETTINGS_NAME}); use another --out "
                        "or --overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(marker, json.dumps(settings, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------
def _logger(progress) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda msg: print(msg, file=sys.stderr, flush=True)
    return lambda msg: None


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def reproduce_command(models: dict, heldout_dir, out_dir, *, num, steps, seed, guidance, guidance_mode, scheduler,
                      use_negative, device, dtype) -> str:
    from ..sampling import DEFAULT_GUIDANCE

    cmd = ["ttt-video", "toyworld", "eval"]
    for name, folder in models.items():
        cmd += ["--model", f"{name}={os.fspath(folder)}"]
    cmd += ["--heldout", os.fspath(heldout_dir), "--num", str(num), "--out", os.fspath(out_dir),
            "--steps", str(steps), "--seed", str(seed)]
    if float(guidance) != DEFAULT_GUIDANCE:
        cmd += ["--guidance", f"{guidance:g}"]
    if guidance_mode != "dynamic":
        cmd += ["--guidance-mode", guidance_mode]
    if scheduler != "dpmpp_2m":
        cmd += ["--scheduler", scheduler]
    if not use_negative:
        cmd.append("--no-negative")
    if str(device) != "auto":
        cmd += ["--device", str(device)]
    if str(dtype) != "auto":
        cmd += ["--dtype", str(dtype)]
    return " ".join(shlex.quote(c) for c in cmd)


def evaluate_models(
    models: dict,
    heldout_dir,
    out_dir,
    *,
    num: int,
    steps: int = 50,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    guidance: float | None = None,
    guidance_mode: str = "dynamic",
    scheduler: str = "dpmpp_2m",
    use_negative: bool = True,
    overwrite: bool = False,
    trust_scores: bool = False,
    vae_row: bool = True,
    progress: bool | Callable[[str], None] = True,
    command: str | None = None,
) -> dict:
    """Generate and score ``num`` held-out storyboards with every model (name -> model folder); write
    ``out_dir/results.json`` and ``out_dir/results.md``; return the results dict (``results["table"]`` is the
    Markdown). ``progress``: True logs to stderr, a callable gets each log line, False is silent.
    ``command``: the command line to print as the reproduction recipe (default: built from the arguments).
    ``trust_scores``: keep a video's score record (same seed and settings) even when its mp4 is absent, e.g.
    records copied back from the GPU machine without their videos; by default such a video is regenerated.
    ``vae_row``: also score the ground truth through each distinct model VAE (the ceiling row)."""
    from .. import pipeline
    from ..sampling import DEFAULT_GUIDANCE

    log = _logger(progress)
    guidance = DEFAULT_GUIDANCE if guidance is None else float(guidance)
    t_start = time.perf_counter()
    folders = check_models(models)
    stories = find_heldout_stories(heldout_dir, num)
    heldout = stories[0]["storyboard"].parent.parent
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} is a file; give a folder")
    results_json = out / "results.json"
    previous = _read_json(results_json) if results_json.is_file() else None
    ours = isinstance(previous, dict) and previous.get("format") == EVAL_FORMAT
    if (results_json.exists() or (out / "results.md").exists()) and not ours:
        raise EvalError(f"{out} holds a results.json / results.md that this evaluation did not write; use another --out")
    settings = {name: _generation_settings(folder, heldout, steps, seed, guidance, guidance_mode, scheduler,
                                           use_negative) for name, folder in folders.items()}
    for name in folders:  # refuse before any model is loaded
        _claim_model_folder(out / name, settings[name], overwrite)
    command = command or reproduce_command(models, heldout_dir, out_dir, num=num, steps=steps, seed=seed,
                                           guidance=guidance, guidance_mode=guidance_mode, scheduler=scheduler,
                                           use_negative=use_negative, device=device, dtype=dtype)
    log(f"evaluating {len(folders)} model(s) on {len(stories)} held-out stories from {heldout} "
        f"({sum(len(s['events']['segments']) for s in stories)} segments), {steps} steps, seed {seed}")

    # ground truth: the dataset's own renders, a check on the scorer (~100 %)
    gt_rows = []
    t0 = time.perf_counter()
    for s in stories:
        gt_rows.append(video_row(score_video(s["ground_truth"], s["events"]), s))
    log(f"[{GROUND_TRUTH}] following {_pct(np.mean([r['following'] for r in gt_rows]))}, consistency "
        f"{_pct(summarize_videos(gt_rows)['consistency']['mean'])} ({time.perf_counter() - t0:.1f} s)")

    vae_rows = vae_round_trip(folders, stories, out / VAE_DIR, log, device=device,
                              trust_scores=trust_scores) if vae_row else {}  # fmt: skip

    model_results = {}
    for name, folder in folders.items():
        model_results[name] = _evaluate_one(pipeline, name, folder, stories, out / name, settings[name], log,
                                            steps=steps, seed=seed, device=device, dtype=dtype, guidance=guidance,
                                            guidance_mode=guidance_mode, scheduler=scheduler,
                                            use_negative=use_negative, overwrite=overwrite,
                                            trust_scores=trust_scores)

    names = list(model_results)
    paired = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            paired.append({"a": a, "b": b, **{k: paired_difference(model_results[a]["videos"], model_results[b]["videos"], k)
                                                for k, _ in TABLE_COLUMNS}})
    results = {
        "format": EVAL_FORMAT,
        "version": EVAL_VERSION,
        "command": command,
        "settings": {"heldout": str(heldout.resolve()), "num": len(stories), "steps": int(steps), "seed": int(seed),
                     "sample_seed": "seed + world seed (the same for every model)", "guidance": guidance,
                     "guidance_mode": guidance_mode, "scheduler": scheduler, "use_negative": bool(use_negative),
                     "device": str(device), "dtype": str(dtype),
                     "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "level": 0.95, "seed": BOOTSTRAP_SEED}},
        "stories": [{"video": s["video"], "world_seed": s["world_seed"], "segments": len(s["events"]["segments"]),
                     "sample_seed": sample_seed(seed, s["world_seed"])} for s in stories],
        "models": model_results,
        GROUND_TRUTH: {"videos": gt_rows, "mean": summarize_videos(gt_rows)},
        "vae_round_trip": vae_rows,
        CHANCE: chance_levels(stories),
        "paired_differences": paired,
        "seconds": time.perf_counter() - t_start,
    }
    table = results_markdown(results)
    results["table"] = table
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(results_json, json.dumps(results, indent=1) + "\n")
    _atomic_write_text(out / "results.md", table + "\n")
    log(f"wrote {results_json} and {out / 'results.md'} ({results['seconds']:.1f} s)")
    return results


def _vae_key(folder: Path) -> str:
    import hashlib

    weights = sorted((Path(folder) / "vae").glob("*.safetensors"))
    if not weights:
        raise EvalError(f"{folder} has no vae/*.safetensors")
    h = hashlib.sha256()
    for w in weights:
        h.update(w.read_bytes())
    return h.hexdigest()[:12]


def vae_round_trip(folders: dict, stories: list[dict], out: Path, log, *, device="auto", trust_scores=False) -> dict:
    """Score the ground truth after each distinct VAE's encode -> posterior mode -> decode; one entry per VAE:
    {label: {"vae": hash, "models": [...], "videos": rows, "mean": ...}}. Cached per (VAE hash, video)."""
    from ..decoding import decode_to_mp4
    from ..pipeline import resolve_device
    from ..training.prepare import encode_video, load_vae
    from .video_io import read_video

    by_vae: dict[str, list[str]] = {}
    for name, folder in folders.items():
        by_vae.setdefault(_vae_key(folder), []).append(name)
    results = {}
    for key, names in by_vae.items():
        label = VAE_ROW if len(by_vae) == 1 else f"{VAE_ROW} ({', '.join(names)})"
        folder, vae, rows, t0 = folders[names[0]], None, [], time.perf_counter()
        for s in stories:
            mp4, record_path = out / key / f"{s['video']}.mp4", out / key / f"{s['video']}.score.json"
            record = _read_json(record_path)
            if record is None or not (mp4.is_file() or trust_scores):
                if vae is None:
                    vae = load_vae(Path(folder), resolve_device(device))
                frames = read_video(s["ground_truth"])
                posterior = encode_video(vae, frames)  # [F_lat, 2C, h, w]: mean, log-variance
                mode = posterior[:, : posterior.shape[1] // 2].unsqueeze(0)
                decode_to_mp4(vae, mode, mp4, latents_scaled=False, overwrite=True)
                record = {"video": s["video"], "vae": key, "report": score_video(mp4, s["events"]).to_dict()}
                _atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")
            rows.append(video_row(ScoreReport(**record["report"]), s, mp4=f"{VAE_DIR}/{key}/{s['video']}.mp4"))
        results[label] = {"vae": key, "models": names, "videos": rows, "mean": summarize_videos(rows)}
        log(f"[{label}] following {_pct(results[label]['mean']['following']['mean'])}, consistency "
            f"{_pct(results[label]['mean']['consistency']['mean'])} ({time.perf_counter() - t0:.1f} s)")
        del vae
    return results


def _evaluate_one(pipeline, name, folder, stories, model_dir: Path, settings, log, *, steps, seed, device, dtype,
                  guidance, guidance_mode, scheduler, use_negative, overwrite, trust_scores=False) -> dict:
    bundle = None
    load_s = 0.0
    description = None
    rows = []
    generated = 0
    generate_s = 0.0
    device_used = None
    t_model = time.perf_counter()
    try:
        for i, s in enumerate(stories):
            vid, mp4 = s["video"], model_dir / f"{s['video']}.mp4"
            record_path = model_dir / f"{vid}.score.json"
            seed_i = sample_seed(seed, s["world_seed"])
            record = None if overwrite else _read_json(record_path)
            if record is not None and not ((mp4.is_file() or trust_scores) and record.get("sample_seed") == seed_i
                                           and record.get("settings") == settings):
                record = None
            if record is None:
                seconds: dict = {}
                resumed = False
                if overwrite or not mp4.is_file():
                    if bundle is None:
                        t0 = time.perf_counter()
                        bundle = pipeline.load_model_bundle(folder, device=device, dtype=dtype)
                        load_s = time.perf_counter() - t0
                        description = bundle.describe()
                        device_used = f"{bundle.device}/{str(bundle.dtype).replace('torch.', '')}"
                        log(f"[{name}] loaded {folder} in {load_s:.1f} s: {description}")
                    result = pipeline.generate(
                        s["storyboard"], mp4, model=bundle, steps=steps, seed=seed_i, guidance=guidance,
                        guidance_mode=guidance_mode, scheduler=scheduler, use_negative=use_negative,
                        overwrite=True)
                    seconds = dict(result.seconds)
                    warnings = [w for w in result.warnings if not w.startswith("NOTE:")]
                    generated += 1
                    generate_s += sum(seconds.values())
                else:  # the mp4 of an interrupted run (written before its score): score it
                    warnings, resumed = [], True
                t0 = time.perf_counter()
                report = score_video(mp4, s["events"])
                seconds["score"] = time.perf_counter() - t0
                record = {"video": vid, "world_seed": s["world_seed"], "sample_seed": seed_i, "settings": settings,
                          "model": description, "seconds": seconds, "warnings": warnings,
                          "scored_existing_mp4": resumed, "report": report.to_dict()}
                _atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")
                state = "scored existing mp4" if resumed else f"{sum(seconds.values()):.1f} s"
            else:
                state = "done earlier"
            report = ScoreReport(**record["report"])
            description = description or record.get("model")
            rows.append(video_row(report, s, sample_seed=seed_i, mp4=f"{name}/{vid}.mp4",
                                  seconds=record.get("seconds", {}), warnings=record.get("warnings", [])))
            r = rows[-1]
            eta = generate_s / generated * (len(stories) - i - 1) if generated else 0.0
            log(f"[{name} {i + 1}/{len(stories)}] {vid} ({r['segments']} seg): following {_pct(r['following'])}, "
                f"consistency {_pct(r['consistency'])}, gap {_pct(r['consistency_gap'])} "
                f"({r['gap_checks']} checks), smoothness {_pct(r['smoothness'])} [{state}]"
                + (f"; eta {eta:.0f} s" if generated and i + 1 < len(stories) else ""))
    finally:
        if bundle is not None:
            device_type = bundle.device.type
            del bundle
            gc.collect()
            if device_type == "cuda":
                import torch

                torch.cuda.empty_cache()
    return {"folder": str(Path(folder).resolve()), "model": description, "device": device_used,
            "load_seconds": load_s, "generated": generated, "generate_seconds": generate_s, "seconds": time.perf_counter() - t_model,
            "videos": rows, "mean": summarize_videos(rows)}


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def _cell(summary: dict) -> str:
    if summary["mean"] is None:
        return "n/a"
    text = f"{100 * summary['mean']:.1f}"
    if summary["ci95"] is not None:
        lo, hi = summary["ci95"]
        text += f" [{100 * lo:.1f}, {100 * hi:.1f}]"
    return text


def _ratio(cell) -> str:
    ok, n = cell
    return f"{100 * ok / n:.0f} ({ok}/{n})" if n else "n/a"


def _fact_breakdown_lines(rows) -> list[str]:
    """Drawing or memory? Each fact where its text names it, later by distance, and what wrong walls show."""
    rows = [(label, mean["facts"]) for _, mean, label in rows if mean.get("facts")]
    if not rows:
        return []
    buckets = list(rows[0][1]["later"]["walls"])
    head = (["model", "scarf where named", "walls where named"] + [f"scarf later, {b} seg." for b in buckets]
            + [f"walls later, {b} seg." for b in buckets] + ["wrong later walls: another room's colour",
                                                               "walls later, entering from another room",
                                                               "wrong entering walls: the previous room's colour"])
    lines = ["", "Where the facts fail (pooled checks, percent (right/checks)): a fact wrong where its text names it "
             "is a drawing failure; right there but wrong later (by segments since it was named) a memory failure; "
             "a wrong wall that has another room's colour of the same story was remembered but tied to the wrong "
             "room; a wrong wall, in a segment the story has just entered, that has the previous segment's room "
             "colour was carried over from where the story was.", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for label, b in rows:
        cells = [_ratio(b["stated"]["scarf"]), _ratio(b["stated"]["walls"])]
        cells += [_ratio(b["later"][fact][k]) for fact in ("scarf", "walls") for k in buckets]
        cells.append(_ratio([b["walls_wrong_other_room"], b["walls_wrong"]]))
        entering = b.get("walls_entering", [0, 0])  # absent from summaries written before it existed
        cells += [_ratio(entering),
                  _ratio([b.get("walls_entering_wrong_previous_room", 0), entering[1] - entering[0]])]
        lines.append("| " + " | ".join([label] + cells) + " |")
    return lines


def results_markdown(results: dict) -> str:
    """The results table (one row per model + ground truth + chance), notes and the reproducing command."""
    s = results["settings"]
    head = ["model"] + [h for _, h in TABLE_COLUMNS] + ["videos"]
    lines = [
        f"# Toy-world evaluation: {len(results['stories'])} held-out storyboards",
        "",
        f"Held-out split `{s['heldout']}` (world seeds {results['stories'][0]['world_seed']}.."
        f"{results['stories'][-1]['world_seed']}, {sum(x['segments'] for x in results['stories'])} segments); "
        f"{s['steps']} steps, {s['scheduler']}, guidance {s['guidance']:g} ({s['guidance_mode']}), sampling seed = "
        f"{s['seed']} + world seed, the same for every model (paired).",
        "",
        "Percent, mean over videos [95% bootstrap interval of the mean]:",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    rows = [(name, m["mean"], f"**{name}**") for name, m in results["models"].items()]
    rows += [(label, v["mean"], label) for label, v in results.get("vae_round_trip", {}).items()]
    rows.append((GROUND_TRUTH, results[GROUND_TRUTH]["mean"], GROUND_TRUTH))
    for _, mean, label in rows:
        lines.append("| " + " | ".join([label] + [_cell(mean[k]) for k, _ in TABLE_COLUMNS] + [str(mean["videos"])]) + " |")
    chance = results[CHANCE]
    lines.append("| " + " | ".join([CHANCE] + ["n/a" if chance[k] is None else f"{100 * chance[k]:.1f}"
                                               for k, _ in TABLE_COLUMNS] + [""]) + " |")
    lines += ["", "Checks behind the consistency columns (pooled over videos):", ""]
    for name, mean, _ in rows:
        lines.append(f"- {name}: consistency {mean['consistency_checks']} checks in {mean['consistency']['n']} "
                     f"videos (pooled {_pct(mean['consistency_pooled'])}); beyond local reach {mean['gap_checks']} "
                     f"checks in {mean['consistency_gap']['n']} videos (pooled {_pct(mean['consistency_gap_pooled'])})")
    lines += _fact_breakdown_lines(rows)
    if results["paired_differences"]:
        lines += ["", "Paired differences (same storyboards and seeds), percentage points, mean [95% bootstrap interval]:", "",
                  "| " + " | ".join(["models"] + [h for _, h in TABLE_COLUMNS]) + " |",
                  "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
        for p in results["paired_differences"]:
            cells = []
            for k, _ in TABLE_COLUMNS:
                d = p[k]
                if d["mean"] is None:
                    cells.append("n/a")
                else:
                    c = f"{100 * d['mean']:+.1f}"
                    if d["ci95"] is not None:
                        c += f" [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"
                    cells.append(f"{c} (n={d['n']})")
            lines.append("| " + " | ".join([f"{p['a']} - {p['b']}"] + cells) + " |")
    lines += ["", "Columns (docs/toyworld.md): storyboard following = room and action of every segment plus each fact "
              "where the text names it; long-range consistency = facts named once (scarf, wall colours) checked in "
              "later segments; beyond local reach = only checks where the fact was not on screen in the previous "
              "segment (segment-local attention cannot see it); chance = a uniform guess (1 of 4 rooms, 1 of 6 "
              "actions, 1 of 4 colours); VAE round trip = the ground truth encoded and decoded by the models' VAE, the "
              "most a DiT on that VAE can score.", ""]
    for name, m in results["models"].items():
        lines.append(f"- {name}: `{m['folder']}`" + (f" ({m['model']})" if m.get("model") else ""))
    lines += ["", "Reproduce:", "", "```bash", results["command"], "```"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# CLI (`ttt-video toyworld eval`, added to the toyworld subcommands by cli.py)
# --------------------------------------------------------------------------------------------------
def _model_arg(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep:
        folder = text
        name = Path(text.rstrip("/\\")).name
    if not name or not folder:
        raise argparse.ArgumentTypeError(f"--model {text!r}: use NAME=DIR, e.g. ttt=runs/ttt/final")
    return name, folder


def configure_eval(sub) -> None:
    """Add the ``eval`` action to the toyworld subparsers."""
    from ..sampling import DEFAULT_GUIDANCE, GUIDANCE_MODES, SCHEDULERS

    e = sub.add_parser("eval", help="generate + score held-out storyboards per model: the results table",
                       description="Generate the first --num held-out storyboards with every --model (one load each, "
                                   "the same sampling seed per storyboard for every model), score them and the ground "
                                   "truth, write OUT/<model>/<video>.mp4, OUT/results.json and OUT/results.md. "
                                   "Re-running continues where a run stopped.")
    e.add_argument("--model", dest="models", action="append", type=_model_arg, required=True, metavar="NAME=DIR",
                   help="a model folder to evaluate under NAME (repeat: --model ttt=DIR --model local=DIR)")
    e.add_argument("--heldout", required=True, metavar="DIR", help="the heldout/ folder of a toy-world dataset")
    e.add_argument("--num", type=int, required=True, help="number of held-out stories (the first, in seed order)")
    e.add_argument("--out", required=True, metavar="DIR", help="output folder")
    e.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    e.add_argument("--seed", type=int, default=0, help="base seed: story with world seed W samples with seed + W (default 0)")
    e.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help=f"guidance strength (default {DEFAULT_GUIDANCE:g})")
    e.add_argument("--guidance-mode", choices=GUIDANCE_MODES, default="dynamic", help="default dynamic")
    e.add_argument("--scheduler", choices=SCHEDULERS, default="dpmpp_2m", help="default dpmpp_2m")
    e.add_argument("--no-negative", action="store_true", help="no negative prompts / guidance")
    e.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ... (default auto)")
    e.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    e.add_argument("--overwrite", action="store_true", help="regenerate videos that exist")
    e.add_argument("--trust-scores", action="store_true",
                   help="keep score records whose mp4 is absent (copied back from another machine without the videos)")
    e.add_argument("--no-vae-row", action="store_true",
                   help="skip the 'VAE round trip' row (the ground truth through each model's VAE: the ceiling)")
    e.add_argument("--quiet", action="store_true", help="no progress lines")


def run_eval(args: argparse.Namespace) -> int:
    from ..cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
    from ..pipeline import PipelineError
    from ..storyboard import StoryboardError

    models = {}
    for name, folder in args.models:
        if name in models:
            print(f"ttt-video toyworld eval: error: model name {name!r} given twice", file=sys.stderr)
            return EXIT_USAGE
        models[name] = folder
    try:
        results = evaluate_models(models, args.heldout, args.out, num=args.num, steps=args.steps, seed=args.seed,
                                  device=args.device, dtype=args.dtype, guidance=args.guidance,
                                  guidance_mode=args.guidance_mode, scheduler=args.scheduler,
                                  use_negative=not args.no_negative, overwrite=args.overwrite,
                                  trust_scores=args.trust_scores, vae_row=not args.no_vae_row,
                                  progress=not args.quiet)
    except KeyboardInterrupt:
        print("\ninterrupted; finished videos are kept: run the same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OSError, ValueError, PipelineError, StoryboardError) as e:
        print(f"ttt-video toyworld eval: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(results["table"])
    return EXIT_OK


__all__ = ["EvalError", "bootstrap_ci", "chance_levels", "configure_eval", "evaluate_models", "find_heldout_stories",
           "results_markdown", "run_eval", "sample_seed"]
