"""scripts/toyworld_pipeline.py: phase sizing from a smoke run and the commands of the two training chains
(the whole job runs on the GPU machine; its CPU smoke run takes ~15 minutes, too long for CI)."""

import importlib.util
import json
from pathlib import Path

import pytest

from ttt_video.ttt_core.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tp():
    spec = importlib.util.spec_from_file_location("toyworld_pipeline", ROOT / "scripts" / "toyworld_pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _timings(tp, per_step):
    return {f"train-{stage}": {v: {"median_step_s": per_step[stage][i]} for i, v in enumerate(tp.VARIANTS)}
            for stage, _ in tp.STAGES}


def test_plan_fits_each_budget_with_the_slower_chain(tp):
    per_step = {"3s": (0.4, 0.2), "9s": (0.5, 0.3), "18s": (0.7, 0.5), "63s": (0.01, 0.02)}
    _, steps = tp.plan_steps(_timings(tp, per_step))
    for stage, _ in tp.STAGES:
        slow = max(per_step[stage])
        assert steps[stage] <= tp.FULL["steps"][stage]
        if steps[stage] < tp.FULL["steps"][stage]:  # limited by time: the slower chain fills the budget
            assert steps[stage] == int(tp.BUDGET[stage] / slow)
    assert steps["63s"] == tp.FULL["steps"]["63s"]  # fast enough: capped


def test_step_times_skip_the_compile_step(tp, tmp_path):
    rows = [{"step": 1, "step_time_s": 30.0, "loss": 2.0}] + [{"step": i, "step_time_s": 0.1 * i, "loss": 1.0 / i}
                                                             for i in range(2, 7)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = tp.step_times(tmp_path / "m.jsonl")
    assert got == {"steps": 6, "median_step_s": 0.4, "last_loss": 1.0 / 6}


@pytest.mark.parametrize("variant", ["ttt", "local"])
def test_chain_commands_build_valid_stage_configs(tp, tmp_path, variant):
    job = tp.Job(tmp_path / "w", tmp_path / "e", smoke=False, device="cuda")
    for i, (stage, segments) in enumerate(tp.STAGES):
        args = [str(a) for a in job.train_args(variant, stage, 123)]
        sets = [args[j + 1] for j, a in enumerate(args) if a == "--set"]
        cfg = load_config(args[args.index("--config") + 1], sets)
        assert cfg.stage.segments == segments and cfg.stage.steps == 123 and cfg.model.preset == "toyworld"
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
