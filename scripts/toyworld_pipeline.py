"""Make the toy-world embedded default end to end on one GPU (issue 6), as one restartable job.

    VAE (train-vae)  ||  datasets (3 / 9 / 18 / 63 s + held-out)      render on CPU while the VAE trains
    -> prepare (latents + T5, one process per stage length)
    -> TTT-MLP and local-attention DiTs, each 3 -> 9 -> 18 -> 63 s (the two chains run side by side)
    -> model folders -> held-out eval (ttt-video toyworld eval) -> export

    python scripts/toyworld_pipeline.py --work DIR --export DIR --smoke   # every phase, a few steps
    python scripts/toyworld_pipeline.py --work DIR --export DIR           # the real run
    python scripts/toyworld_pipeline.py --work DIR --export DIR --no-eval # ... with the eval left for a CPU
    python scripts/toyworld_pipeline.py --work DIR --export DIR --no-eval --dit-steps 3s=600,9s=300,18s=250,63s=160
                                                                          # the second run (fixed DiT steps)

The real run gives every phase a wall-time budget (BUDGET), so it fits the device lease: the VAE trainer, prepare
(--max-minutes) and each DiT stage (stage.max_minutes: the trainer times its first steps, then plans the stage's
length and anneals its learning rate to that end) stop on time and still hand over a finished result. The two
variants run side by side with the same time budget per stage (local attention, the faster layer, gets the
more steps; any lead the TTT model shows is despite that). Each phase
leaves a marker (WORK/done/<phase>) and a re-run skips finished phases, so a job that dies can continue.
Runs on a CPU too (slowly): the smoke run is how this script is tested. Commands run through
`python -m ttt_video.ttt_core.cli`, so the repo must be importable as `ttt_video` (installed, or a shim).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ttt_video.ttt_core.cli"]
STAGES = [("3s", 1), ("9s", 3), ("18s", 6), ("63s", 21)]
VARIANTS = {"ttt": "ttt_mlp", "local": "none"}
DATASET_SEEDS = {"3s": 100_000, "9s": 200_000, "18s": 300_000, "63s": 0}  # distinct training stories per length
HELDOUT = 24

# (videos per stage length, training steps per stage, VAE steps, eval storyboards, eval steps)
# The smoke run passes the same flags as the real run (time budgets, profiling), only smaller: its 5 steps per
# stage end before a budget binds, and its one profiled step is the 4th.
SMOKE = dict(videos={"3s": 16, "9s": 8, "18s": 4, "63s": 2}, heldout=2, steps={s: 5 for s, _ in STAGES},
             vae_steps=12, eval_num=2, eval_steps=3, profile_steps=1)
# Videos rendered per stage length; prepare encodes what its time budget allows (the first run, 2026-11-23,
# managed 7.8 / 2.6 / 1.4 / 0.5 clips/s side by side before the read-ahead; the rest is simply not used).
FULL = dict(videos={"3s": 5000, "9s": 1500, "18s": 600, "63s": 250}, heldout=HELDOUT,
            steps={"3s": 5000, "9s": 2000, "18s": 1000, "63s": 1000},  # caps; the time budget decides
            vae_steps=20000, eval_num=HELDOUT, eval_steps=30, profile_steps=3)
# Seconds of wall time per phase in the real run. The first run had 150 s for a VAE at batch 16 (foreground
# palette accuracy only 0.44): CPU experiments (docs/toyworld.md, "Training the VAE") show batch matters far
# more than learning rate, hence 48 and 240 s. Its DiT steps were host-bound (0.3-0.5 s at any batch size), so
# the stage configs now use 3x its batches (configs/toyworld/*.toml). With --no-eval (the held-out eval, 250 s
# of the first run's lease, then runs on a CPU afterwards) the DiT stages get that time; ~26 of 30 minutes.
BUDGET = {"vae": 240, "prepare": 180, "3s": 240, "9s": 120, "18s": 100, "63s": 100}
BUDGET_NO_EVAL = {**BUDGET, "3s": 330, "9s": 170, "18s": 140, "63s": 140}
VAE_BATCH = 48


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Job:
    def __init__(self, work: Path, export: Path, smoke: bool, device: str, fixed_steps: bool = False,
                 vae: Path | None = None, init: dict[str, Path] | None = None, stages: list[str] | None = None):
        self.work, self.export, self.smoke, self.device = work, export, smoke, device
        self.fixed_steps = fixed_steps  # the DiT stages run their step counts, with no time budget
        # continuing a finished run: its VAE (not retrained), each chain's transformer as the first stage's start,
        # and the stages to run (a subset of STAGES, in order)
        self.vae, self.init = vae, init or {}
        self.stages = [(s, k) for s, k in STAGES if stages is None or s in stages]
        self.size = SMOKE if smoke else FULL
        self.train_set: dict[str, list[str]] = {}  # stage -> trainer --set overrides (--train-set)
        self.eval_start = True  # a continued run also evaluates where it started (--no-start-eval: not)
        self.max_scene_segments: dict[str, int] = {}  # stage -> shorter training scenes (--max-scene-segments)
        (work / "logs").mkdir(parents=True, exist_ok=True)
        (work / "done").mkdir(exist_ok=True)
        export.mkdir(parents=True, exist_ok=True)
        self.timings: dict = {}

    # ---------------------------------------------------------------------------------------------
    def run(self, name: str, args: list[str], *, deadline_s: float | None = None, env: dict | None = None) -> float:
        """Run one command with its output in logs/<name>.log; SIGTERM it at the deadline (the trainer then
        checkpoints and stops). Returns its wall time; raises on a non-zero exit."""
        path = self.work / "logs" / f"{name}.log"
        t0 = time.perf_counter()
        with open(path, "a") as f:
            f.write(f"$ {' '.join(map(str, args))}\n")
            f.flush()
            proc = subprocess.Popen([str(a) for a in args], stdout=f, stderr=subprocess.STDOUT, cwd=self.work,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
            stopped = False
            while proc.poll() is None:
                time.sleep(1.0)
                if deadline_s is not None and not stopped and time.perf_counter() - t0 > deadline_s:
                    log(f"{name}: over its {deadline_s:.0f} s budget, stopping it (it checkpoints)")
                    proc.send_signal(signal.SIGTERM)
                    stopped = True
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = path.read_text(errors="replace").splitlines()[-25:]
            raise RuntimeError(f"{name} failed (exit {proc.returncode}) after {dt:.0f} s:\n" + "\n".join(tail))
        log(f"{name}: done in {dt:.1f} s")
        return dt

    def run_parallel(self, commands: dict[str, list], deadline_s: float | None = None,
                     env: dict | None = None) -> dict[str, float]:
        """Run the named commands side by side; wall time per name. The first failure is raised once all ended."""
        walls, errors = {}, []

        def go(name):
            try:
                walls[name] = self.run(name, commands[name], deadline_s=deadline_s, env=env)
            except Exception as err:  # noqa: BLE001 -- raised below, after the other commands end
                errors.append(err)

        threads = [threading.Thread(target=go, args=(name,)) for name in commands]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return walls

    def phase_done(self, phase: str) -> bool:
        return (self.work / "done" / phase).is_file()

    def mark(self, phase: str, info: dict | None = None) -> None:
        (self.work / "done" / phase).write_text(json.dumps(info or {}))

    # ---------------------------------------------------------------------------------------------
    def vae_and_data(self, vae_steps: int) -> None:
        if self.phase_done("vae_data"):
            return
        batch = 4 if (self.smoke and self.device == "cpu") else VAE_BATCH  # a CPU smoke run checks the flow only
        # a time budget: the VAE trainer ends its schedule on time
        vae_args = [*CLI, "toyworld", "train-vae", "--out", "vae", "--steps", vae_steps, "--batch-size", batch,
                    "--workers", 2 if self.smoke else 6, "--device", self.device, "--force",
                    "--max-minutes", f"{BUDGET['vae'] / 60:.2f}", "--log-every", 1 if self.smoke else 100]
        commands = {} if self.vae else {"train-vae": vae_args}
        if self.vae:  # a given VAE: copied, not trained (the datasets are still rendered)
            shutil.rmtree(self.work / "vae", ignore_errors=True)
            shutil.copytree(self.vae, self.work / "vae")
        for stage, k in self.data_stages():
            args = [*CLI, "toyworld", "dataset", "--out", f"data/ds{stage}", "--num", self.size["videos"][stage],
                    "--segments", k, "--seed", DATASET_SEEDS[stage], "--workers", self.render_workers(), "--quiet"]
            if stage == "63s":
                args += ["--heldout", self.size["heldout"]]
            if stage in self.max_scene_segments:  # the training split only: the held-out stories keep theirs
                args += ["--max-scene-segments", self.max_scene_segments[stage]]
            commands[f"dataset-{stage}"] = args
        self.timings.update(self.run_parallel(commands))
        self.assemble("toymodel", None)
        self.mark("vae_data")

    def render_workers(self) -> int:
        """Render processes per dataset: the host's cores shared by the datasets rendered side by side (and
        the VAE trainer's 6 loader workers when it trains); the third run's 3 rendered 400 videos in 164 s."""
        if self.smoke:
            return 2
        free = (os.cpu_count() or 4) - (0 if self.vae else 6)
        return max(3, min(12, free // len(self.data_stages())))

    def data_stages(self) -> list[tuple[str, int]]:
        """Stage lengths that need data: the stages that run, and 63 s always (the held-out set)."""
        return [(s, k) for s, k in STAGES if (s, k) in self.stages or s == "63s"]

    def assemble(self, name: str, transformer: str | None) -> Path:
        args = [sys.executable, REPO / "scripts" / "make_embedded_default.py", "--out", f"models/{name}", "--vae", "vae",
                "--force"]
        if transformer:
            args += ["--transformer", transformer]
        self.run(f"assemble-{name}", args)
        return self.work / "models" / name

    def prepare(self) -> None:
        if self.phase_done("prepare"):
            return
        self.timings.update(self.run_parallel({f"prepare-{stage}": [
            *CLI, "prepare", "--annotations", f"data/ds{stage}/train/annotations.json", "--segments", k,
            "--preset", "toyworld", "--model", "models/toymodel", "--out", f"data/p{stage}", "--device", self.device,
            "--max-minutes", f"{BUDGET['prepare'] / 60:.2f}", "--processes", self.prepare_processes()]
            for stage, k in self.stages}))
        self.mark("prepare")

    def prepare_processes(self) -> int:
        """Processes per prepare: one small VAE leaves the GPU mostly idle (the third run prepared 1.1 clips/s
        in one process), so up to 4 per stage length share it, 8 in all."""
        if self.smoke or self.device == "cpu" or (self.device == "auto" and not shutil.which("nvidia-smi")):
            return 1
        return max(1, min(4, 8 // len(self.stages)))

    def train_args(self, variant: str, stage: str, steps: int) -> list:
        names = [s for s, _ in self.stages]
        at = names.index(stage)
        start = f"runs/{variant}/{names[at - 1]}" if at else self.init.get(variant)  # None: from scratch
        args = [*CLI, "train", "--config", REPO / "configs" / "toyworld" / f"{stage}.toml",
                "--set", f'data.manifest="data/p{stage}/manifest.jsonl"',
                "--set", f'checkpoint.dir="runs/{variant}/{stage}"',
                "--set", f'model.init_from=[{json.dumps(str(start)) if start else ""}]',
                "--set", f'model.overrides={{global_layer="{VARIANTS[variant]}"}}',
                "--set", f"stage.steps={steps}", "--set", f'run.device="{self.device}"',
                "--summary-json", f"logs/train-{variant}-{stage}.summary.json"]
        # the trainer fits the stage (and its learning-rate schedule) into the budget; profiled steps tell
        # where a step's time goes (runs/<variant>/<stage>/profile.txt)
        args += ["--set", f"stage.max_minutes={0 if self.fixed_steps else BUDGET[stage] / 60:.3f}",
                 "--set", f"logging.profile_steps={self.size['profile_steps']}"]
        for item in self.train_set.get(stage, []):  # --train-set: the same override for both chains
            args += ["--set", item]
        if self.smoke:
            args += ["--set", "logging.log_every=1", "--set", "checkpoint.interval=0"]
            if self.device == "cpu":  # checks the flow only; the GPU smoke run keeps the real batch (it is timed)
                args += ["--set", "data.batch_size=1"]
        return args

    def train(self, steps_for: dict[str, int]) -> None:
        for stage, _ in self.stages:
            if self.phase_done(f"train-{stage}"):
                continue
            steps = steps_for[stage]
            deadline = None if self.smoke or self.fixed_steps else BUDGET[stage] * 1.25 + 60  # only if well off the plan
            walls = self.run_parallel({f"train-{v}-{stage}": self.train_args(v, stage, steps) for v in VARIANTS},
                                      deadline_s=deadline)
            info = {"steps": steps, "wall_s": walls}
            for v in VARIANTS:
                info[v] = step_times(self.work / "runs" / v / stage / "metrics.jsonl")
            self.timings[f"train-{stage}"] = info
            self.mark(f"train-{stage}", info)

    def assemble_models(self) -> None:
        """One model folder per variant from its chain's last stage."""
        for v in VARIANTS:
            self.assemble(v, f"runs/{v}/{self.stages[-1][0]}")

    def eval_models(self) -> list[str]:
        """The trained variants, and for a continued run (--init) also where each chain started ("<v>-start",
        with the same VAE), so the table pairs before and after on the same stories, seeds and device."""
        names = list(VARIANTS)
        for v in VARIANTS:
            if v in self.init and self.eval_start:
                self.assemble(f"{v}-start", str(self.init[v]))
                names.append(f"{v}-start")
        return names

    def evaluate(self) -> None:
        if self.phase_done("eval"):
            return
        self.assemble_models()
        names = self.eval_models()
        common = ["--heldout", "data/ds63s/heldout", "--num", self.size["eval_num"], "--steps",
                  self.size["eval_steps"], "--device", self.device, "--out", "eval", "--quiet"]
        # one process per model side by side (each resumes the shared folder), then one pass that only
        # scores what exists, adds the VAE round-trip ceiling and writes the combined table
        # the host's cores shared by the side-by-side processes: the fourth run's four evals at torch's default
        # thread count each scored a video in 3.7 s (0.4 s alone on a 2-core CPU) and ran out of lease
        threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 4) // len(names)))}
        self.run_parallel({f"eval-{v}": [*CLI, "toyworld", "eval", "--model", f"{v}=models/{v}", *common,
                                          "--no-vae-row"] for v in names}, env=threads)  # the table pass adds it
        # a given VAE (--vae) had its round trip measured in the run that trained it (docs/results.md): the table
        # pass skips that row, which took the minutes that ran past the lease in the eighth, ninth and eleventh runs
        vae_row = ["--no-vae-row"] if self.vae else []
        self.timings["eval"] = self.run("eval-table", [*CLI, "toyworld", "eval", *sum(
            (["--model", f"{v}=models/{v}"] for v in names), []), *common, *vae_row])
        self.mark("eval")

    def pack(self) -> None:
        """What comes back: the two transformers + the VAE (weights) and one archive of logs and results."""
        (self.work / "timings.json").write_text(json.dumps(self.timings, indent=1))
        for v in VARIANTS:
            src = self.work / "models" / v / "transformer" / "diffusion_pytorch_model.safetensors"
            if src.is_file():
                shutil.copy2(src, self.export / f"transformer-{v}.safetensors")
                shutil.copy2(src.with_name("config.json"), self.export / f"transformer-{v}.config.json")
                continue
            # no model folder yet (the job is still running or died): the newest stage checkpoint instead
            for stage, _ in reversed(self.stages):
                shards = sorted((self.work / "runs" / v / stage).glob("step_*/model/*.safetensors"))
                if shards:
                    shutil.copy2(shards[-1], self.export / f"transformer-{v}-{stage}-partial.safetensors")
                    shutil.copy2(shards[-1].with_name("config.json"), self.export / f"transformer-{v}-{stage}-partial.config.json")
                    break
        with tarfile.open(self.export / "vae.tar", "w") as tar:
            if (self.work / "vae").is_dir():
                tar.add(self.work / "vae", arcname="vae")
        with tarfile.open(self.export / "reports.tar.gz", "w:gz") as tar:
            for sub in ["logs", "timings.json", "vae/metrics.jsonl"]:
                if (self.work / sub).exists():
                    tar.add(self.work / sub, arcname=sub)
            for v in VARIANTS:
                for stage, _ in self.stages:
                    for name, packed in (("metrics.jsonl", ".jsonl"), ("profile.txt", "-profile.txt"),
                                         ("profile.json", "-profile.json")):
                        m = self.work / "runs" / v / stage / name
                        if m.is_file():
                            tar.add(m, arcname=f"metrics/{v}-{stage}{packed}")
            ev = self.work / "eval"
            if ev.is_dir():
                for p in sorted(ev.rglob("*")):
                    if p.is_file() and (p.suffix in (".json", ".md") or p.stem in self._sample_videos()):
                        tar.add(p, arcname=f"eval/{p.relative_to(ev)}")
        log(f"packed {sorted(p.name for p in self.export.iterdir())}")

    def _sample_videos(self) -> set[str]:
        """The first three held-out videos of each model travel back (for looking at, not only numbers)."""
        ids = sorted(p.stem for p in (self.work / "data" / "ds63s" / "heldout" / "videos").glob("*.mp4"))
        return set(ids[:3])


def step_times(metrics: Path) -> dict:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    times = sorted(r["step_time_s"] for r in rows[1:] if "step_time_s" in r)  # the first step compiles
    last = rows[-1] if rows else {}
    return {"steps": last.get("step", 0), "median_step_s": times[len(times) // 2] if times else None,
            "last_loss": last.get("loss")}


def vae_step_time(work: Path) -> float | None:
    m = work / "vae" / "metrics.jsonl"
    if not m.is_file():
        return None
    rows = [json.loads(line) for line in m.read_text().splitlines() if line.strip()]
    vals = [r.get("s_per_step") or r.get("step_time_s") for r in rows[1:]]
    vals = sorted(v for v in vals if v)
    return vals[len(vals) // 2] if vals else None


def per_stage(ap: argparse.ArgumentParser, flag: str, text: str | None, stages: list[str]) -> dict[str, int] | None:
    """``3s=N,9s=N`` -> {stage: N}: one positive integer for each stage that runs (an argparse error otherwise)."""
    if not text:
        return None
    try:
        values = {s: int(n) for s, n in (item.split("=") for item in text.split(","))}
    except ValueError:
        values = {}
    if set(values) != set(stages) or min(values.values()) < 1:
        ap.error(f"{flag} needs a positive integer for each stage that runs ({stages}), got {text!r}")
    return values


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="working folder (datasets, runs, models, eval)")
    ap.add_argument("--export", type=Path, required=True, help="where the weights and reports are packed")
    ap.add_argument("--smoke", action="store_true", help="every phase with a few steps; measures step times")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--pack-only", action="store_true", help="only pack what exists now into --export")
    ap.add_argument("--no-eval", action="store_true",
                    help="skip the held-out eval (run `ttt-video toyworld eval` elsewhere) and give its time to "
                         "the DiT stages")
    ap.add_argument("--no-start-eval", action="store_true",
                    help="with --init: evaluate the trained models only, not where they started (the previous "
                         "run's own evaluation has those scores; two eval processes instead of four)")
    ap.add_argument("--vae", type=Path, default=None,
                    help="use this VAE folder instead of training one (e.g. models/embedded-default/vae)")
    ap.add_argument("--init", default=None, metavar="ttt=DIR,local=DIR",
                    help="continue a finished run: each chain's first stage starts from this transformer folder")
    ap.add_argument("--stages", default=None, metavar="9s,18s,63s",
                    help="the DiT stages to run, in order (default: 3s,9s,18s,63s)")
    ap.add_argument("--dit-steps", default=None, metavar="3s=N,9s=N,18s=N,63s=N",
                    help="fixed DiT steps per stage that runs, instead of time budgets (the second run, "
                         "2026-11-23: 3s=600,9s=300,18s=250,63s=160)")
    ap.add_argument("--videos", default=None, metavar="63s=N",
                    help="training videos to render for each stage that runs (default: %s)" % FULL["videos"])
    ap.add_argument("--max-scene-segments", default=None, metavar="63s=N",
                    help="training stories' scenes last 1..N segments for each stage that runs (default 4; smaller: "
                         "more room changes, each a moment where a wall colour must be tied to its room)")
    ap.add_argument("--prepare-seconds", type=int, default=None,
                    help=f"time budget of the prepare phase (default {BUDGET['prepare']} s; the third run's 400 "
                         "one-minute videos needed ~370 s, 194 were prepared in 180)")
    ap.add_argument("--stage-seconds", default=None, metavar="9s=S,18s=S,63s=S",
                    help="wall-time budget of each DiT stage that runs (default: BUDGET, BUDGET_NO_EVAL)")
    ap.add_argument("--train-set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                    help="a trainer --set for one stage of both chains (repeatable), e.g. "
                         "63s:optimizer.lr_ttt=0.001")
    args = ap.parse_args(argv)
    if args.no_eval and not args.smoke:
        BUDGET.update(BUDGET_NO_EVAL)
    stages = [x for x in args.stages.split(",") if x] if args.stages else [s for s, _ in STAGES]
    if not stages or not set(stages) <= {s for s, _ in STAGES}:
        ap.error(f"--stages takes a comma-separated subset of {[s for s, _ in STAGES]}, got {args.stages!r}")
    init = {}
    for item in (args.init.split(",") if args.init else []):
        name, _, folder = item.partition("=")
        if name not in VARIANTS or not Path(folder).is_dir():
            ap.error(f"--init takes {'/'.join(VARIANTS)}=<transformer folder> items, got {item!r}")
        init[name] = Path(folder).resolve()
    if args.init and set(init) != set(VARIANTS):
        ap.error(f"--init needs a transformer for each of {list(VARIANTS)} (a fair comparison starts both)")
    if args.vae and not (args.vae / "config.json").is_file():
        ap.error(f"--vae {args.vae}: not a VAE folder (no config.json)")
    dit_steps = per_stage(ap, "--dit-steps", args.dit_steps, stages)
    train_set: dict[str, list[str]] = {}
    for item in args.train_set:
        stage, _, setting = item.partition(":")
        if stage not in stages or "=" not in setting:
            ap.error(f"--train-set takes STAGE:KEY=VALUE for a stage that runs ({stages}), got {item!r}")
        train_set.setdefault(stage, []).append(setting)
    if args.prepare_seconds is not None:
        if args.prepare_seconds < 1:
            ap.error("--prepare-seconds must be positive")
        BUDGET["prepare"] = args.prepare_seconds
    if args.stage_seconds:
        BUDGET.update(per_stage(ap, "--stage-seconds", args.stage_seconds, stages))
    job = Job(args.work.resolve(), args.export.resolve(), args.smoke, args.device, fixed_steps=bool(dit_steps),
              vae=args.vae.resolve() if args.vae else None, init=init, stages=stages)
    job.train_set = train_set
    job.eval_start = not args.no_start_eval
    job.max_scene_segments = per_stage(ap, "--max-scene-segments", args.max_scene_segments, stages) or {}
    if dit_steps:
        job.size = {**job.size, "steps": dit_steps}
    if args.videos:
        job.size = {**job.size, "videos": {**job.size["videos"], **per_stage(ap, "--videos", args.videos, stages)}}
    if args.pack_only:
        job.pack()
        return 0
    t0 = time.perf_counter()
    vae_steps, steps = job.size["vae_steps"], job.size["steps"]  # the real run's are caps: BUDGET decides
    log(f"plan: vae {vae_steps} steps; DiT steps {steps}; videos {job.size['videos']}"
        + ("" if args.smoke else f"; budgets (s) {BUDGET}"))
    try:
        job.vae_and_data(vae_steps)
        job.timings["vae_step_s"] = vae_step_time(job.work)
        job.prepare()
        job.train(steps)
        if args.no_eval:
            job.assemble_models()
        else:
            job.evaluate()
    finally:
        job.timings["plan"] = {"vae_steps": vae_steps, "steps": steps}
        job.timings["total_s"] = time.perf_counter() - t0
        job.pack()
    log(f"all done in {time.perf_counter() - t0:.0f} s")
    (job.work / "ALL_DONE").write_text("ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
