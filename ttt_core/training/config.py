"""Stage configuration: one TOML file per context-extension stage (3 / 9 / 18 / 30 / 63 s).

A stage config names the model preset, where the weights start (``init_from``), the prepared data, the
trainable set, the optimiser and schedule, precision, memory options, checkpointing and logging. Every field
has a default, so a config only states what differs; ``--set section.key=value`` overrides single fields
from the command line (the value is parsed as TOML, so ``--set training.steps=10`` gives an int).

Relative paths in a config are resolved against the current working directory (the repository root in the
shipped configs), not against the config file, so that ``--set`` paths and config paths behave alike.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAINABLE_SETS = ("all", "ttt_qkvo", "ttt")
PRECISIONS = ("bf16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")
TEXT_DROPOUT_MODES = ("zeros", "empty_prompt")


@dataclass
class StageSection:
    name: str = "3s"
    segments: int = 1  # 3-s segments per training video: 3 s -> 1, 9 s -> 3, 18 s -> 6, 30 s -> 10, 63 s -> 21
    steps: int = 5000
    # > 0: a wall-time budget for the stage (minutes, from the first step). After a few steps the trainer
    # measures its step time and shortens the stage to the steps that fit (never more than `steps`), with the
    # learning-rate schedule re-planned to end there, so the stage still anneals and exports; 0 = off.
    max_minutes: float = 0.0
    # "all": every parameter (paper's 3-s stage); "ttt_qkvo": TTT layers + gates + attention q/k/v/o and its
    # q/k norms (paper's later stages, the official "qkvo" adapter); "ttt": TTT layers + gates only.
    trainable: str = "all"


@dataclass
class ModelSection:
    preset: str = "cogvideox-5b"
    overrides: dict[str, Any] = field(default_factory=dict)  # single TTTDiTConfig fields
    # Where the weights start. "" = random initialisation. Otherwise a list applied in order: the first
    # entry may be anything ttt_core.loading reads (diffusers folder / single file) or one of our checkpoint
    # directories; later entries are safetensors files (e.g. a previous stage's export) overlaid on top.
    init_from: list[str] = field(default_factory=list)


@dataclass
class DataSection:
    manifest: str = ""  # JSONL written by `ttt-video prepare`
    batch_size: int = 1  # videos per process per micro-batch
    grad_accum_steps: int = 1
    text_dropout: float = 0.1  # probability of dropping a video's whole text (classifier-free guidance)
    text_dropout_mode: str = "zeros"  # "zeros" (official dropout_txt) | "empty_prompt" (T5 of "")
    sample_posterior: bool = True  # draw latents from the stored VAE posterior (official) or use its mean


@dataclass
class OptimizerSection:
    lr: float = 1e-5  # non-TTT parameters
    lr_ttt: float = 1e-4  # TTT parameters and gates
    lr_end: float = 1e-5
    schedule: str = "linear"  # non-TTT groups (official: linear from lr to lr_end, i.e. flat at 1e-5)
    schedule_ttt: str = "cosine"
    warmup_fraction: float = 0.02  # paper: 2 % warm-up
    warmup_steps: int = -1  # >= 0 overrides warmup_fraction
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    # AdamW implementation: false = one parameter at a time (bounded memory: the multi-tensor path makes
    # temporaries the size of all optimizer state at once, ~13 GB for the 5B model's 3.2 B trainable
    # parameters in the later stages); true = torch's foreach path (faster, more memory).
    foreach: bool = False


@dataclass
class PrecisionSection:
    # "bf16": parameters gathered in bf16 for compute (FSDP2 MixedPrecisionPolicy), fp32 master weights,
    # fp32 gradient reduction, fp32 optimiser state, fp32 loss. "fp32": everything fp32 (default on CPU,
    # where bf16 matmuls are slow and tests want tight tolerances).
    mixed: str = "bf16"
    cpu_mixed: str = "fp32"  # what "mixed" becomes when running without a GPU


@dataclass
class MemorySection:
    activation_checkpointing: bool = True  # per transformer block
    scan_checkpoint_group_size: int = 16  # TTT scan rematerialised every G mini-batches (0 = off)
    cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy: parameters, gradients and optimizer state on host
    # keep the tensors saved for backward (with per-block checkpointing: each block's input hidden states,
    # 6 KB per token per block in bf16) in pinned host memory (torch.autograd.graph.save_on_cpu)
    offload_activations: bool = False
    reshard_after_forward: bool = True


@dataclass
class CheckpointSection:
    dir: str = "runs/stage"
    interval: int = 500  # steps between checkpoints (0 = only at the end / SIGTERM)
    keep: int = 2  # newest checkpoints kept (the final one is always kept)
    export: bool = True  # write inference weights (TTT + changed parameters) at the end
    export_dtype: str = "bf16"  # "bf16" (what inference runs in; half the size) | "fp32" (master weights)


@dataclass
class LoggingSection:
    log_every: int = 1
    tensorboard: bool = True
    # > 0: profile this many steps (after the first few) and write profile.txt / profile.json to the checkpoint
    # folder: kernels per step, host vs device time, the costliest operators (training/profiling.py)
    profile_steps: int = 0


@dataclass
class RunSection:
    seed: int = 0
    device: str = "auto"  # "auto" | "cuda" | "cpu"


@dataclass
class TrainConfig:
    stage: StageSection = field(default_factory=StageSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    memory: MemorySection = field(default_factory=MemorySection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    run: RunSection = field(default_factory=RunSection)

    # ----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(msg: str):
            raise ValueError(f"invalid training config: {msg}")

        if self.stage.segments < 1:
            bad(f"stage.segments must be >= 1, got {self.stage.segments}")
        if self.stage.steps < 1:
            bad(f"stage.steps must be >= 1, got {self.stage.steps}")
        if self.stage.max_minutes < 0:
            bad(f"stage.max_minutes must be >= 0 (0 = no time budget), got {self.stage.max_minutes}")
        if self.stage.trainable not in TRAINABLE_SETS:
            bad(f"stage.trainable must be one of {TRAINABLE_SETS}, got {self.stage.trainable!r}")
        if self.precision.mixed not in PRECISIONS or self.precision.cpu_mixed not in PRECISIONS:
            bad(f"precision.mixed / cpu_mixed must be one of {PRECISIONS}")
        for name in ("schedule", "schedule_ttt"):
            if getattr(self.optimizer, name) not in SCHEDULES:
                bad(f"optimizer.{name} must be one of {SCHEDULES}, got {getattr(self.optimizer, name)!r}")
        if not 0.0 <= self.data.text_dropout < 1.0:
            bad(f"data.text_dropout must be in [0, 1), got {self.data.text_dropout}")
        if self.data.text_dropout_mode not in TEXT_DROPOUT_MODES:
            bad(f"data.text_dropout_mode must be one of {TEXT_DROPOUT_MODES}")
        if self.data.batch_size < 1 or self.data.grad_accum_steps < 1:
            bad("data.batch_size and data.grad_accum_steps must be >= 1")
        if len(self.optimizer.betas) != 2:
            bad(f"optimizer.betas needs two numbers, got {self.optimizer.betas}")
        if self.checkpoint.export_dtype not in PRECISIONS:
            bad(f"checkpoint.export_dtype must be one of {PRECISIONS}")
        if self.run.device not in ("auto", "cuda", "cpu"):
            bad(f"run.device must be auto, cuda or cpu, got {self.run.device!r}")

    @property
    def warmup_steps(self) -> int:
        if self.optimizer.warmup_steps >= 0:
            return self.optimizer.warmup_steps
        return max(1, round(self.optimizer.warmup_fraction * self.stage.steps))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _section_class(name: str):
    return {
        "stage": StageSection,
        "model": ModelSection,
        "data": DataSection,
        "optimizer": OptimizerSection,
        "precision": PrecisionSection,
        "memory": MemorySection,
        "checkpoint": CheckpointSection,
        "logging": LoggingSection,
        "run": RunSection,
    }[name]


def config_from_dict(data: dict[str, Any], *, source: str = "<dict>") -> TrainConfig:
    sections = {}
    for name, values in data.items():
        if name not in _SECTIONS:
            raise ValueError(f"{source}: unknown section [{name}]; known: {sorted(_SECTIONS)}")
        if not isinstance(values, dict):
            raise ValueError(f"{source}: [{name}] must be a table")
        cls = _section_class(name)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown} in [{name}]; known: {sorted(known)}")
        values = dict(values)
        if name == "model" and isinstance(values.get("init_from"), str):
            values["init_from"] = [values["init_from"]] if values["init_from"] else []
        sections[name] = cls(**values)
    cfg = TrainConfig(**sections)
    cfg.validate()
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value); the value is parsed as a TOML value."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ValueError(f"--set expects section.key=value, got {text!r}")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: --set checkpoint.dir=runs/x
    return section, key, value


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist")
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    for text in overrides or []:
        section, key, value = parse_override(text)
        data.setdefault(section, {})[key] = value
    return config_from_dict(data, source=str(path))
