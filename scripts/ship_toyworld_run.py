"""Ship a finished toy-world device run: the files `scripts/device_toyworld.sh poll` copied back become the
embedded default (the TTT chain) and the comparison model (the local chain), and the run's reports become a
folder of docs/device-logs.

    python scripts/ship_toyworld_run.py --export <files_at of the last poll> \
        --logs docs/device-logs/toyworld-<date>-run<N> \
        --note "toy-world TTT-DiT (TTT-MLP), trained on one H100: ..." \
        --local-note "local-attention comparison (global layer none), trained like the embedded default: ..."

Every input is read from --export by its fixed name (never picked from a folder listing), and before it reports
success the script compares the shipped transformers with the export's tensor by tensor. Session 9 shipped an
older run's weights by hand (a temporary folder picked by name with a glob); this is the step that cannot.
Nothing is written unless every input is there and the check passes (the models are built in a staging copy
and swapped in); an existing --logs folder is not overwritten without --force.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# what a finished run's export holds (an unfinished one has "-63s-partial" transformers instead: not shippable)
EXPORT_FILES = ("transformer-ttt.safetensors", "transformer-ttt.config.json", "transformer-local.safetensors",
                "transformer-local.config.json", "vae.tar", "reports.tar.gz")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _maker():
    spec = importlib.util.spec_from_file_location("make_embedded_default", REPO / "scripts" / "make_embedded_default.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extract(archive: Path, dest: Path) -> None:
    if not hasattr(tarfile, "data_filter"):
        raise SystemExit("shipping needs Python >= 3.10.12 / 3.11.4 (tarfile's safe 'data' extraction filter)")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")  # no absolute paths, links out of dest or devices


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def check_same_weights(shipped: Path, exported: Path) -> None:
    """Every tensor of the shipped file equals the export's (the shipped file may be re-saved as float32)."""
    from safetensors.torch import load_file

    a, b = load_file(str(shipped)), load_file(str(exported))
    if a.keys() != b.keys():
        raise SystemExit(f"{shipped} and {exported} hold different tensors")
    differ = [k for k in a if not torch.equal(a[k].float(), b[k].float())]
    if differ:
        raise SystemExit(f"{shipped} is not {exported}: {len(differ)} of {len(a)} tensors differ (e.g. {differ[0]})")


def pack_eval(reports: Path) -> None:
    """The evaluation as docs keep it: its table (eval-results.md / .json) and every model's score records and
    settings in scores.tar.gz (enough for `toyworld eval --trust-scores` to rebuild the table); no videos."""
    ev = reports / "eval"
    if not ev.is_dir():
        return
    for name in ("results.md", "results.json"):
        if (ev / name).is_file():
            os.replace(ev / name, reports / f"eval-{name}")
    records = sorted(p for p in ev.glob("*/*.json") if p.name.endswith(".score.json") or p.name == "eval_settings.json")
    if records:
        with tarfile.open(reports / "scores.tar.gz", "w:gz") as tar:
            for p in records:
                tar.add(p, arcname=str(p.relative_to(ev)))
    shutil.rmtree(ev)


def ship(export: Path, logs: Path, note: str, local_note: str, models: Path, force: bool = False) -> None:
    missing = [name for name in EXPORT_FILES if not (export / name).is_file()]
    if missing:
        raise SystemExit(f"{export}: not a finished run's export, missing {', '.join(missing)}")
    if logs.exists() and not force:
        raise SystemExit(f"{logs} exists; pass --force to replace it")
    embedded, local_dir = models / "embedded-default", models / "comparison" / "local-attention" / "transformer"
    if not (embedded / "model_index.json").is_file() or not (local_dir / "config.json").is_file():
        raise SystemExit(f"{models}: expected embedded-default/ and comparison/local-attention/transformer/ in it")

    with tempfile.TemporaryDirectory(prefix="ship-") as tmp:
        staged = Path(tmp)
        (staged / "transformer").mkdir()
        shutil.copyfile(export / "transformer-ttt.safetensors", staged / "transformer" / WEIGHTS)
        shutil.copyfile(export / "transformer-ttt.config.json", staged / "transformer" / "config.json")
        _extract(export / "vae.tar", staged)
        if not (staged / "vae" / "config.json").is_file():
            raise SystemExit(f"{export / 'vae.tar'}: no vae/config.json in it")
        reports = staged / "reports"
        _extract(export / "reports.tar.gz", reports)

        # both models are built and checked in a staging copy next to them, then swapped in: a failure leaves
        # the shipped ones as they were
        stage_dir = Path(tempfile.mkdtemp(dir=models, prefix=".ship-"))
        try:
            new_embedded, new_local = stage_dir / "embedded-default", stage_dir / "local-transformer"
            shutil.copytree(embedded, new_embedded)
            shutil.copytree(local_dir, new_local)
            # the TTT chain: the embedded default, fp32 as evaluated (tokenizer, text encoder, scheduler stay)
            _maker().write(new_embedded, transformer=staged / "transformer", vae=staged / "vae", base=new_embedded,
                           dtype="fp32", note=note, seed=0, force=True)
            # the local chain: the comparison's transformer folder, byte for byte, with its note
            cfg = json.loads((export / "transformer-local.config.json").read_text())
            cfg["_note"] = local_note
            (new_local / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            shutil.copyfile(export / "transformer-local.safetensors", new_local / WEIGHTS)
            check_same_weights(new_embedded / "transformer" / WEIGHTS, export / "transformer-ttt.safetensors")
            check_same_weights(new_local / WEIGHTS, export / "transformer-local.safetensors")
            for new, dst in ((new_embedded, embedded), (new_local, local_dir)):
                old = dst.with_name(f".old-{dst.name}")
                os.replace(dst, old)
                os.replace(new, dst)
                shutil.rmtree(old)
        finally:
            shutil.rmtree(stage_dir, ignore_errors=True)

        # the run's reports: logs, metrics (jsonl gzipped: they are most of the bytes), the evaluation's table and
        # score records, the poll's log tail
        for jsonl in reports.rglob("*.jsonl"):
            with open(jsonl, "rb") as src, gzip.open(f"{jsonl}.gz", "wb", compresslevel=9) as dst:
                shutil.copyfileobj(src, dst)
            jsonl.unlink()
        pack_eval(reports)
        if (export / "full-tail.log").is_file():
            shutil.copyfile(export / "full-tail.log", reports / "full-tail.log")
        logs.parent.mkdir(parents=True, exist_ok=True)
        if logs.exists():
            shutil.rmtree(logs)
        shutil.copytree(reports, logs)
    print(f"shipped {export}: embedded default {_sha(embedded / 'transformer' / WEIGHTS)}, "
          f"comparison {_sha(local_dir / WEIGHTS)} (both equal to the export's tensors); reports in {logs}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, required=True, help="the files the last `poll` copied back")
    ap.add_argument("--logs", type=Path, required=True, help="new folder for the run's reports")
    ap.add_argument("--note", required=True, help="the embedded default's note (its whole training history)")
    ap.add_argument("--local-note", required=True, help="the comparison model's note")
    ap.add_argument("--models", type=Path, default=REPO / "models", help="folder with embedded-default/, comparison/")
    ap.add_argument("--force", action="store_true", help="replace an existing --logs folder")
    args = ap.parse_args(argv)
    ship(args.export, args.logs, args.note, args.local_note, args.models, args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
