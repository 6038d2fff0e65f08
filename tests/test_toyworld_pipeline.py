"""scripts/toyworld_pipeline.py: the commands of the two training chains and their time budgets (the whole job
runs on the GPU machine; its CPU smoke run takes ~15 minutes, too long for CI)."""

import json

import pytest

from ttt_video.ttt_core.training.config import load_config


@pytest.fixture(scope="module")
def tp(load_script):
    return load_script("scripts/toyworld_pipeline.py")


def test_step_times_skip_the_compile_step(tp, tmp_path):
    rows = [{"step": 1, "step_time_s": 30.0, "loss": 2.0}] + [{"step": i, "step_time_s": 0.1 * i, "loss": 1.0 / i}
                                                             for i in range(2, 7)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = tp.step_times(tmp_path / "m.jsonl")
    assert got == {"steps": 6, "median_step_s": 0.4, "last_loss": 1.0 / 6}


@pytest.mark.parametrize("variant", ["ttt", "local"])
@pytest.mark.parametrize("smoke", [False, True])
def test_chain_commands_build_valid_stage_configs(tp, tmp_path, variant, smoke):
    job = tp.Job(tmp_path / "w", tmp_path / "e", smoke=smoke, device="cuda")
    for i, (stage, segments) in enumerate(tp.STAGES):
        args = [str(a) for a in job.train_args(variant, stage, 123)]
        sets = [args[j + 1] for j, a in enumerate(args) if a == "--set"]
        cfg = load_config(args[args.index("--config") + 1], sets)
        assert cfg.stage.segments == segments and cfg.stage.steps == 123 and cfg.model.preset == "toyworld"
        # each stage ends on its time budget (both variants the same); the smoke run passes the same flags
        assert cfg.stage.max_minutes == pytest.approx(tp.BUDGET[stage] / 60, abs=1e-3)
        assert cfg.logging.profile_steps == (1 if smoke else 3)
        assert cfg.model.overrides == {"global_layer": tp.VARIANTS[variant]}
        assert cfg.checkpoint.dir == f"runs/{variant}/{stage}"
        assert cfg.data.manifest == f"data/p{stage}/manifest.jsonl"
        # each stage starts from the previous stage of the same chain, the first from scratch
        assert cfg.model.init_from == ([] if i == 0 else [f"runs/{variant}/{tp.STAGES[i - 1][0]}"])


def test_run_parallel_waits_for_all_and_raises_the_failure(tp, tmp_path):
    import sys

    job = tp.Job(tmp_path / "w", tmp_path / "e", smoke=True, device="cpu")
    sleeper = [sys.executable, "-c", "import time; time.sleep(1.5); open('slow_done', 'w').write('x')"]
    with pytest.raises(RuntimeError, match="fails failed"):
        job.run_parallel({"slow": sleeper, "fails": [sys.executable, "-c", "raise SystemExit(3)"]})
    assert (tmp_path / "w" / "slow_done").is_file()  # the other command was not abandoned
    assert "$ " in (tmp_path / "w" / "logs" / "fails.log").read_text()
    walls = job.run_parallel({"a": [sys.executable, "-c", "pass"], "b": [sys.executable, "-c", "pass"]})
    assert set(walls) == {"a", "b"}


def test_fixed_dit_steps_drop_the_time_budget(tp, tmp_path):
    # the second device run (2026-11-23) trained fixed step counts: no stage may then end on a time budget
    job = tp.Job(tmp_path / "w", tmp_path / "e", smoke=False, device="cuda", fixed_steps=True)
    args = [str(a) for a in job.train_args("ttt", "9s", 300)]
    cfg = load_config(args[args.index("--config") + 1], [args[j + 1] for j, a in enumerate(args) if a == "--set"])
    assert cfg.stage.steps == 300 and cfg.stage.max_minutes == 0
    with pytest.raises(SystemExit):  # a stage without a count is refused before anything runs
        tp.main(["--work", str(tmp_path / "w2"), "--export", str(tmp_path / "e2"), "--dit-steps", "3s=10,9s=5"])
    with pytest.raises(SystemExit):
        tp.main(["--work", str(tmp_path / "w2"), "--export", str(tmp_path / "e2"), "--dit-steps", "3s=x"])
    assert not (tmp_path / "w2").exists()


def test_continuing_a_run_starts_each_chain_from_its_model_and_keeps_the_vae(tp, tmp_path, monkeypatch):
    # the next device run can spend its lease on the DiTs: the shipped VAE is kept, both chains continue
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text("{}")
    init = {"ttt": tmp_path / "ttt-transformer", "local": tmp_path / "local-transformer"}
    job = tp.Job(tmp_path / "w", tmp_path / "e", smoke=False, device="cuda", vae=vae, init=init, stages=["9s", "63s"])
    for variant in tp.VARIANTS:
        starts = []
        for stage in ("9s", "63s"):
            args = [str(a) for a in job.train_args(variant, stage, 10)]
            cfg = load_config(args[args.index("--config") + 1], [args[j + 1] for j, a in enumerate(args) if a == "--set"])
            starts.append(cfg.model.init_from)
        assert starts == [[str(init[variant])], [f"runs/{variant}/9s"]]

    ran = {}
    monkeypatch.setattr(job, "run_parallel", lambda commands, deadline_s=None: ran.update(commands) or {})
    monkeypatch.setattr(job, "assemble", lambda name, transformer: None)
    job.vae_and_data(100)
    assert sorted(ran) == ["dataset-63s", "dataset-9s"]  # no VAE training; data for the stages that run (+ held-out)
    assert (tmp_path / "w" / "vae" / "config.json").is_file()


@pytest.mark.parametrize("bad", [["--stages", "9s,27s"], ["--init", "ttt=/nonexistent,local=/nonexistent"],
                                 ["--stages", "63s", "--dit-steps", "3s=5,63s=5"], ["--vae", "/nonexistent"],
                                 ["--stages", "18s,63s", "--stage-seconds", "18s=300,63s=0"],
                                 ["--stages", "63s", "--train-set", "3s:optimizer.lr_ttt=0.001"],
                                 ["--stages", "63s", "--train-set", "63s:optimizer.lr_ttt"]])
def test_continuation_options_are_checked_before_anything_runs(tp, tmp_path, bad):
    with pytest.raises(SystemExit):
        tp.main(["--work", str(tmp_path / "w"), "--export", str(tmp_path / "e"), *bad])
    assert not (tmp_path / "w").exists()


def test_train_set_reaches_both_chains_of_its_stage_only(tp, tmp_path, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def capture(self, steps):
        for v in tp.VARIANTS:
            for stage in ("3s", "63s"):
                seen[v, stage] = [str(a) for a in self.train_args(v, stage, 10)]
        raise Stop

    monkeypatch.setattr(tp.Job, "vae_and_data", lambda self, steps: None)
    monkeypatch.setattr(tp, "vae_step_time", lambda work: None)
    monkeypatch.setattr(tp.Job, "prepare", lambda self: None)
    monkeypatch.setattr(tp.Job, "train", capture)
    monkeypatch.setattr(tp.Job, "pack", lambda self: None)
    with pytest.raises(Stop):
        tp.main(["--work", str(tmp_path / "w"), "--export", str(tmp_path / "e"), "--stages", "3s,63s",
                 "--train-set", "63s:optimizer.lr_ttt=0.001", "--train-set", "63s:optimizer.warmup_steps=50"])
    for v in tp.VARIANTS:
        assert "optimizer.lr_ttt=0.001" in seen[v, "63s"] and "optimizer.warmup_steps=50" in seen[v, "63s"]
        assert not any(a.startswith("optimizer.") for a in seen[v, "3s"])


@pytest.mark.parametrize("flag, expected", [([], ["ttt", "local", "ttt-start", "local-start"]),
                                           (["--no-start-eval"], ["ttt", "local"])])
def test_no_start_eval_drops_the_start_models_from_a_continued_run(tp, tmp_path, monkeypatch, flag, expected):
    evaluated = []

    class Stop(Exception):
        pass

    def capture(self, steps):
        evaluated.extend(self.eval_models())
        raise Stop

    for v in tp.VARIANTS:
        (tmp_path / v).mkdir()
    monkeypatch.setattr(tp.Job, "vae_and_data", lambda self, steps: None)
    monkeypatch.setattr(tp, "vae_step_time", lambda work: None)
    monkeypatch.setattr(tp.Job, "prepare", lambda self: None)
    monkeypatch.setattr(tp.Job, "assemble", lambda self, name, transformer: None)
    monkeypatch.setattr(tp.Job, "train", capture)
    monkeypatch.setattr(tp.Job, "pack", lambda self: None)
    with pytest.raises(Stop):
        tp.main(["--work", str(tmp_path / "w"), "--export", str(tmp_path / "e"), "--stages", "63s",
                 "--init", f"ttt={tmp_path / 'ttt'},local={tmp_path / 'local'}", *flag])
    assert evaluated == expected


def test_stage_values_are_one_positive_integer_per_stage(tp):
    import argparse

    ap = argparse.ArgumentParser()
    assert tp.per_stage(ap, "--stage-seconds", "9s=300,63s=400", ["9s", "63s"]) == {"9s": 300, "63s": 400}
    assert tp.per_stage(ap, "--stage-seconds", None, ["9s"]) is None
    for bad in ("9s=300", "9s=300,63s=x", "9s=300,63s=400,3s=5", "9s=-1,63s=4"):
        with pytest.raises(SystemExit):
            tp.per_stage(ap, "--stage-seconds", bad, ["9s", "63s"])


def test_videos_and_prepare_budget_reach_the_commands(tp, tmp_path, monkeypatch):
    # the third run (2026-11-23) rendered 400 one-minute videos, and prepare's 180 s budget cut them to 194
    monkeypatch.setattr(tp, "BUDGET", dict(tp.BUDGET))
    ran = {}

    class Stop(Exception):
        pass

    def no_training(self, steps):
        raise Stop

    monkeypatch.setattr(tp.Job, "run_parallel", lambda self, commands, deadline_s=None: ran.update(commands) or {})
    monkeypatch.setattr(tp.Job, "assemble", lambda self, name, transformer: None)
    monkeypatch.setattr(tp.Job, "train", no_training)
    monkeypatch.setattr(tp.Job, "pack", lambda self: None)
    with pytest.raises(Stop):
        tp.main(["--work", str(tmp_path / "w"), "--export", str(tmp_path / "e"), "--stages", "63s",
                 "--videos", "63s=400", "--prepare-seconds", "420", "--stage-seconds", "63s=560", "--device", "cuda",
                 "--max-scene-segments", "63s=2"])
    data = [str(a) for a in ran["dataset-63s"]]
    assert data[data.index("--num") + 1] == "400" and data[data.index("--max-scene-segments") + 1] == "2"
    prep = [str(a) for a in ran["prepare-63s"]]
    assert prep[prep.index("--max-minutes") + 1] == "7.00"
    assert tp.BUDGET["63s"] == 560 and sorted(ran) == ["dataset-63s", "prepare-63s", "train-vae"]
    # one small VAE leaves a GPU mostly idle: the GPU run prepares in several processes, a CPU run in one
    assert prep[prep.index("--device") + 1] == "cuda" and prep[prep.index("--processes") + 1] == "4"
    cpu = tp.Job(tmp_path / "w2", tmp_path / "e2", smoke=False, device="cpu")
    assert cpu.prepare_processes() == 1
    assert int(data[data.index("--workers") + 1]) >= 3


def test_a_continued_run_is_evaluated_beside_where_it_started(tp, tmp_path, monkeypatch):
    folders = {v: tmp_path / f"start-{v}" for v in tp.VARIANTS}
    job = tp.Job(tmp_path / "w", tmp_path / "e", smoke=True, device="cpu", init=folders, stages=["63s"])
    assembled, ran = {}, {}
    monkeypatch.setattr(tp.Job, "assemble", lambda self, name, transformer: assembled.update({name: transformer}))
    envs = []

    def run_parallel(self, commands, deadline_s=None, env=None):
        envs.append(env)
        return ran.update(commands) or {}

    monkeypatch.setattr(tp.Job, "run_parallel", run_parallel)
    monkeypatch.setattr(tp.Job, "run", lambda self, name, args, deadline_s=None, env=None: ran.update({name: args}) or 1.0)
    monkeypatch.setattr(tp.os, "cpu_count", lambda: 16)
    job.evaluate()
    assert envs == [{"OMP_NUM_THREADS": "4"}]  # 16 cores shared by the 4 side-by-side evals
    assert assembled == {"ttt": "runs/ttt/63s", "local": "runs/local/63s", "ttt-start": str(folders["ttt"]),
                         "local-start": str(folders["local"])}
    table = [str(a) for a in ran["eval-table"]]
    models = [table[i + 1] for i, a in enumerate(table) if a == "--model"]
    assert models == ["ttt=models/ttt", "local=models/local", "ttt-start=models/ttt-start",
                      "local-start=models/local-start"]
    assert sorted(ran) == ["eval-local", "eval-local-start", "eval-table", "eval-ttt", "eval-ttt-start"]
    assert "--no-vae-row" not in table  # a VAE trained in this run: its round trip is the table's ceiling row
    job.vae, ran = tmp_path / "given-vae", {}  # --vae: measured when it was trained, not again
    (job.work / "done" / "eval").unlink()  # run the phase again
    job.evaluate()
    assert "--no-vae-row" in [str(a) for a in ran["eval-table"]]
    fresh = tp.Job(tmp_path / "w3", tmp_path / "e3", smoke=True, device="cpu")  # from scratch: the two chains only
    assert fresh.eval_models() == list(tp.VARIANTS)
    job.eval_start = False  # --no-start-eval: the trained chains only, nothing assembled for the starts
    assembled.clear()
    assert job.eval_models() == list(tp.VARIANTS) and assembled == {}
