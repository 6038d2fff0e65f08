"""ttt-video CLI: --help documents everything, generate on one segment, refusing to overwrite, Ctrl-C leaves
a checkpoint and prints the resume command, which then finishes the video."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from ttt_video.ttt_core import cli, sampling

av = pytest.importorskip("av")

STORY = "A paper kite rises over a green hill on a windy afternoon.\n"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TTT_VIDEO_CACHE_DIR", str(tmp_path / "cache"))


def frames_of(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return sum(1 for _ in c.decode(video=0)), s.codec_context.width, s.codec_context.height, s.average_rate


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--storyboard", "--out", "--model", "--ttt-weights", "--steps", "--seed", "--scheduler",
                 "--guidance", "--guidance-mode", "--segment-seeds", "--regenerate", "--resume", "--overwrite",
                 "--offload", "--cfg", "--checkpoint-every", "--text-encoder", "--vae", "--device", "--dtype"):
        assert flag in text, flag
    assert "toy" in text and "dpmpp_2m" in text and "ddim" in text
    # every option has a help text
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["generate"]
    assert all(a.help for a in sub._actions), [a.dest for a in sub._actions if not a.help]


def test_segment_argument_parsing():
    assert cli._segment_list("3,5-7") == [2, 4, 5, 6]
    assert cli._segment_seeds("3=123,5=77") == {2: 123, 4: 77}
    assert cli._segment_seeds("11,12,13") == {0: 11, 1: 12, 2: 13}
    for bad in ("0", "4-2"):
        with pytest.raises(Exception):
            cli._segment_list(bad)


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "ttt_video.ttt_core.cli", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "generate" in r.stdout


def test_generate_one_segment_and_refuse_overwrite(tmp_path, capsys):
    story = tmp_path / "kite.txt"
    story.write_text(STORY)
    out = tmp_path / "kite.mp4"
    rc = cli.main(["generate", "--storyboard", str(story), "--out", str(out), "--steps", "2", "--seed", "3",
                   "--scheduler", "ddim", "--quiet"])
    assert rc == 0
    assert frames_of(out) == (49, 96, 64, 16)
    printed = capsys.readouterr()
    assert "49 frames" in printed.out and "cat-and-mouse" in printed.err
    before = out.read_bytes()
    rc = cli.main(["generate", "--storyboard", str(story), "--out", str(out), "--steps", "1", "--quiet"])
    assert rc == cli.EXIT_ERROR
    assert "refusing to overwrite" in capsys.readouterr().err and out.read_bytes() == before
    rc = cli.main(["generate", "--storyboard", str(story), "--out", str(out), "--steps", "1", "--quiet", "--overwrite"])
    assert rc == 0


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[[{"txt": "typo"}]]')
    rc = cli.main(["generate", "--storyboard", str(bad), "--out", str(tmp_path / "v.mp4"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_ERROR and str(bad) in err and "txt" in err
    assert not (tmp_path / "v.mp4").exists()
    with pytest.raises(SystemExit):
        cli.main(["generate", "--storyboard", str(bad), "--out", "x.mp4", "--scheduler", "euler"])
    with pytest.raises(SystemExit):
        cli.main(["generate", "--storyboard", str(bad), "--out", "x.mp4", "--segment-seeds", "1=2,3"])


def test_ctrl_c_leaves_checkpoint_and_resume_command(tmp_path, capsys, monkeypatch):
    story = tmp_path / "kite.txt"
    story.write_text(STORY + "\nThe kite string snaps and the kite drifts over a river.\n")
    out = tmp_path / "kite.mp4"
    real = sampling._call_model
    calls = {"n": 0}

    def ctrl_c_on_third_call(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sampling, "_call_model", ctrl_c_on_third_call)
    rc = cli.main(["generate", "--storyboard", str(story), "--out", str(out), "--steps", "4", "--seed", "5", "--quiet"])
    assert rc == cli.EXIT_INTERRUPTED and not out.exists()
    err = capsys.readouterr().err
    resume_line = next(line.strip() for line in err.splitlines() if line.strip().startswith("ttt-video generate --resume"))
    argv = shlex.split(resume_line)[1:]
    ckpt = argv[argv.index("--resume") + 1]
    meta = sampling.read_checkpoint_meta(ckpt)
    assert meta["step"] >= 1 and meta["settings"]["steps"] == 4 and meta["settings"]["seed"] == 5

    monkeypatch.setattr(sampling, "_call_model", real)
    assert cli.main(argv + ["--quiet"]) == 0
    assert frames_of(out)[0] == 1 + 4 * (25 - 1)
