"""The run spec: a frozen description of one training run, with a deterministic run id.

A :class:`RunSpec` fully describes a run: model family and size (or width), parametrization, optimizer and
LR schedule, batch, budget, data mixture and number of subjects, masking settings and seed. Its
:attr:`RunSpec.run_id` is a readable prefix plus a hash of every field that changes the result, never a
timestamp, so a rerun of a study finds its earlier self::

    swift_v2-debug-sp-S2e+01-3fa9c2d1
    |family  |size |par|budget  |hash
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

#: Fields that do not change what a run computes (so they do not enter the run id). The manifest *path*
#: is among them: a study records the manifest content hash and refuses to mix data versions.
NON_SEMANTIC_FIELDS = frozenset({"study", "manifest", "num_workers", "checkpoint_every", "keep_last", "keep_best",
                                 "micro_batch_size", "distributed", "zero_stage", "bad_data",
                                 "log_every", "compile", "deepspeed_config", "gc_every", "notes",
                                 "activation_checkpointing", "cuda_graphs"})

SCHEDULES = ("cosine", "wsd", "constant")
BUDGET_KINDS = ("steps", "samples", "tokens", "flops")
PARAMETRIZATIONS = ("sp", "mup")
PRECISIONS = ("auto", "bf16", "fp32")
TASKS = ("pretrain", "finetune")
STRATEGIES = ("scratch", "last_block", "lora", "prompt", "frozen_mlp", "full")
DISTRIBUTED = ("ddp", "deepspeed")
SCALINGS = ("minmax", "znorm_zeroback", "znorm_minback", "robust", "none")


def _freeze(value: Any) -> Any:
    """Turn dicts and lists into sorted tuples so specs stay hashable and JSON round-trips are stable."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


#: what a name that becomes a path component may look like (study names, families, sizes, run ids): letters,
#: digits, '.', '_', '-', not starting with '.' or '-', so never '..', a hidden file, an option or a '/'
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_NAME_RE = re.compile(NAME_PATTERN)
#: string fields that end up in file names (storage folders, run ids)
PATH_FIELDS = ("study", "family", "size")


def check_name(field: str, value: Any) -> str:
    """Return ``value`` if it is safe as one path component, else raise ``ValueError`` naming the field."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValueError(f"{field}={value!r} is not a valid name: it must match {NAME_PATTERN} "
                         "(letters, digits, '.', '_', '-'; no '/', not starting with '.' or '-')")
    return value


def _check_model(family: str, size: str) -> None:
    from neuro_models import registry  # layering: study may import the models; the families load lazily

    _choice("family", family, tuple(registry.list_families()))
    sizes = tuple(registry.list_sizes(family))
    if size not in sizes:
        raise ValueError(f"size={size!r} is not a size of family {family!r}; choose one of {list(sizes)}")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One training run. Every field is part of the run id unless listed in ``NON_SEMANTIC_FIELDS``."""

    # --- identity -------------------------------------------------------------------------------
    study: str = "default"
    """Study the run belongs to (not part of the run id)."""
    task: str = "pretrain"
    """``pretrain`` (masked-image modeling / next-token) or ``finetune`` (downstream head)."""
    # --- model ----------------------------------------------------------------------------------
    family: str = "swift_v2"
    """Model family in :mod:`neuro_models.registry` (``swift_v2``, ``swift_v2_revised``, ``neuromamba``)."""
    size: str = "debug"
    """Named size of the family (``debug``, ``51M``, ...)."""
    width: int | None = None
    """Override of the model width (embed dim); ``None`` keeps the named size's width."""
    model_overrides: tuple = ()
    """Further config fields as ``((name, value), ...)``: masking settings, depths, patch size, ..."""
    parametrization: str = "sp"
    """``sp`` (standard) or ``mup`` (maximal update, via the ``mup`` package)."""
    mup_base_width: int | None = None
    """Base width of the muP base shapes; ``None`` uses the family's default."""
    # --- optimizer ------------------------------------------------------------------------------
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    schedule: str = "cosine"
    """``cosine`` (warmup + cosine), ``wsd`` (warmup-stable-decay) or ``constant`` (after warmup)."""
    warmup_frac: float = 0.05
    decay_frac: float = 0.2
    """Fraction of the run spent in the final decay of ``wsd``."""
    min_lr_ratio: float = 0.1
    # --- batch and budget ----------------------------------------------------------------------
    batch_size: int = 8
    """Global batch size in samples (windows) per optimizer step."""
    micro_batch_size: int | None = None
    """Samples per rank per forward; ``None`` = batch_size // world_size (no accumulation)."""
    budget_kind: str = "steps"
    budget: float = 20
    """Training budget in ``budget_kind`` units; rounded up to whole steps."""
    eval_every: int = 10
    eval_windows: int = 16
    """Validation windows per evaluation (fixed set, fixed masks)."""
    # --- data -----------------------------------------------------------------------------------
    manifest: str = ""
    """Path of the cohort manifest (Parquet)."""
    cohorts: tuple = ()
    """Cohort mixture as ``((cohort, weight), ...)``; empty = all cohorts, natural weights."""
    n_subjects: int | None = None
    """Cap on pre-training subjects (the data axis of a scaling study)."""
    grid: tuple = (96, 96, 96)
    sequence_length: int = 20
    stride_within: int = 1
    stride_between: float = 1.0
    scaling: str = "znorm_zeroback"
    target: str | None = None
    """Label column for fine-tuning."""
    # --- fine-tuning ----------------------------------------------------------------------------
    strategy: str = "scratch"
    init_from: str | None = None
    """Exported weights (safetensors) to start from."""
    task_type: str = "classification"
    lora_rank: int = 8
    prompt_tokens: int = 8
    # --- runtime --------------------------------------------------------------------------------
    bad_data: str = "stop"
    """Policy for unreadable subject files or non-finite windows met mid-training: ``stop`` (raise, naming
    the file) or ``skip`` (use the next window and record the bad one in the reports)."""
    precision: str = "auto"
    distributed: str = "ddp"
    zero_stage: int = 1
    deepspeed_config: str = ""
    """JSON object merged (recursively) over the DeepSpeed config the engine generates, e.g.
    ``'{"zero_optimization": {"overlap_comm": true}}'``; batch sizes and the ZeRO stage stay the spec's."""
    seed: int = 0
    num_workers: int = 0
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0: only at the end and before a graceful stop)."""
    keep_last: int = 2
    keep_best: bool = True
    log_every: int = 1
    compile: bool = False
    """Regional ``torch.compile`` of the model's blocks (``neuro_models.layers.compile_regions``): faster
    steps on GPUs after a one-off compilation of a few minutes; numerically equivalent, so not part of
    the run id."""
    cuda_graphs: bool = True
    """With ``compile`` on a CUDA device: CUDA graphs for the regions the family marks launch-bound
    (``ModelFamily.cuda_graph_regions``; SwiFT: the small late stages), when a rank's step is one micro-batch and
    the run is not under DeepSpeed. Replays the same kernels, so not part of the run id."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward instead of keeping them (the run planner turns it on
    when a run does not fit otherwise); numerically equivalent, so not part of the run id."""
    gc_every: int = 10
    """Run Python's garbage collector by hand every N optimizer steps, at the same step on every rank, with
    the automatic collector off during the loop (0: Python's automatic collector). An automatic full
    collection pauses one rank for 100+ ms at a moment of its own (every few steps once torch, DeepSpeed
    and Ray are imported); in synchronous data-parallel training every other rank then waits at the next
    gradient all-reduce. Objects alive when the loop starts are frozen out of the collections, so a
    manual one costs well under a millisecond."""
    notes: str = ""

    def __post_init__(self) -> None:
        for name in ("model_overrides", "cohorts", "betas", "grid"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))
        for name in PATH_FIELDS:
            check_name(name, getattr(self, name))
        _check_model(self.family, self.size)
        _choice("task", self.task, TASKS)
        _choice("parametrization", self.parametrization, PARAMETRIZATIONS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("budget_kind", self.budget_kind, BUDGET_KINDS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("distributed", self.distributed, DISTRIBUTED)
        _choice("scaling", self.scaling, SCALINGS)
        _choice("task_type", self.task_type, ("classification", "regression"))
        _choice("bad_data", self.bad_data, ("stop", "skip"))
        if not (self.budget > 0 and math.isfinite(self.budget)):
            raise ValueError(f"budget={self.budget!r} must be a positive finite number of {self.budget_kind}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size={self.batch_size} must be positive")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must be positive or None")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if self.deepspeed_config:
            try:
                extra = json.loads(self.deepspeed_config)
            except json.JSONDecodeError as exc:
                raise ValueError(f"deepspeed_config is not JSON: {exc}") from exc
            if not isinstance(extra, dict):
                raise ValueError(f"deepspeed_config must be a JSON object, got {type(extra).__name__}")
        if self.gc_every < 0:
            raise ValueError(f"gc_every={self.gc_every} must be >= 0 (0: Python's automatic collector)")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage}; allowed: 0, 1, 2, 3")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.decay_frac <= 1:
            raise ValueError("warmup_frac must be in [0, 1) and decay_frac in [0, 1]")
        if self.sequence_length <= 0 or self.stride_within <= 0 or not 0 < self.stride_between <= 1:
            raise ValueError("sequence_length and stride_within must be positive; stride_between in (0, 1]")
        if len(self.grid) != 3:
            raise ValueError(f"grid={self.grid!r} must have 3 spatial sizes")
        if self.task == "finetune" and not self.target:
            raise ValueError("task='finetune' needs target=<label column>")
        check_name("run_id", self.run_id)  # made of checked parts; checked anyway, since it names folders

    # --- identity -------------------------------------------------------------------------------
    def semantic_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in NON_SEMANTIC_FIELDS}

    @property
    def spec_hash(self) -> str:
        blob = json.dumps(self.semantic_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    @property
    def run_id(self) -> str:
        width = f"-w{self.width}" if self.width else ""
        task = "" if self.task == "pretrain" else f"-ft-{self.strategy}"
        budget = f"{self.budget_kind[0].upper()}{self.budget:.3g}".replace("+", "")
        return f"{self.family}-{self.size}{width}-{self.parametrization}{task}-{budget}-{self.spec_hash}"

    # --- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=list)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown RunSpec fields {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**{k: _freeze(v) for k, v in d.items()})

    @classmethod
    def from_json(cls, s: str) -> "RunSpec":
        return cls.from_dict(json.loads(s))

    def replace(self, **changes: Any) -> "RunSpec":
        return dataclasses.replace(self, **changes)

    def flat_columns(self) -> dict[str, Any]:
        """The spec as flat result-store columns (``spec.<field>``), tuples as JSON text."""
        out = {}
        for k, v in self.to_dict().items():
            out[f"spec.{k}"] = json.dumps(v) if isinstance(v, tuple) else v
        return out


def model_overrides(spec: RunSpec) -> dict[str, Any]:
    """The spec's model overrides as a dict (tuple values stay tuples)."""
    return {k: v for k, v in spec.model_overrides}
