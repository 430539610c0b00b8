"""Typed configuration: one pydantic model per stage, composed into one experiment config read from TOML.

Every default lives here (or in the stage's own config model that this module composes: ``EvalConfig``,
``AlignConfig``); the CLI's options default to "not given" and only override what the user types. A config
file is TOML whose tables are the sections below; ``--set section.key=value`` overrides one key (the value
is read as TOML, so ``0.1``, ``true``, ``[0.01, 0.02]`` and ``"text"`` work; a bare word is a string).

Loading, merging and validation are pydantic-settings' (:class:`TomlConfigSettingsSource` for the file, the
init source for the overrides, deep-merged, the overrides winning); unknown or invalid keys are reported by
:func:`load_config` as errors naming the key, the file and line where it is known, and the allowed values.
"""

from __future__ import annotations

import inspect
import json
import re
import tomllib
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from .ablation import DEFAULT_SPARSITIES, GROUP_KINDS, PQ_PRESETS
from .align import AlignConfig
from .evaluation.config import EvalConfig, GenerationBatchSize, SweepEvalConfig
from .evaluation.generation import CPU_AUTO_BATCH
from .finetune.job import ATTACK_DEFAULTS, FinetuneConfig
from .io import BrittleError, FrozenConfig

STAGES = ("align", "data", "scores", "groups", "ablation", "lowrank", "finetune", "overlap", "stats", "eval", "report")
StageName = Literal["align", "data", "scores", "groups", "ablation", "lowrank", "finetune", "overlap", "stats", "eval",
                    "report"]
Fraction = float  # 0 < x <= 1, checked by the validators below


class ConfigError(BrittleError):
    """A configuration file or override that does not validate."""



def _fraction(value: float, name: str) -> float:
    if not 0 < value <= 1:
        hint = f"; did you mean {value / 100:g}?" if 1 < value <= 100 else ""
        raise ValueError(f"{name} must be a fraction with 0 < {name} <= 1 (1% is 0.01), got {value:g}{hint}")
    return value


class DataConfig(FrozenConfig):
    """Stage ``data``: the calibration sets, written to ``data/<name>.jsonl``.

    ``sets`` maps a set name to its spec: ``"safety"`` = harmful prompts (training split, never the evaluation
    prompts) + the model's own greedy answers that ``judge`` calls refusals; ``"utility"`` = benign
    instructions + the model's own non-empty answers; anything else = a prompt source name or a
    ``.jsonl``/``.csv`` file with responses. The other settings apply to the sets built from the model.
    """

    sets: dict[str, str] = Field(default_factory=lambda: {"safety": "safety", "utility": "utility"}, description=(
        "Sets to write, name -> spec: \"safety\" = harmful prompts (training split) + the model's greedy answers "
        "that judge calls refusals; \"utility\" = benign instructions + its non-empty answers; else a source name "
        "or a .jsonl/.csv file with responses."))
    n_safety: int = Field(256, gt=0, description="Harmful prompts to answer (before the refusal filter).")
    n_utility: int = Field(256, gt=0, description="Benign instructions to answer.")
    max_new_tokens: int = Field(64, gt=0, description="Greedy generation length of the built sets.")
    batch_size: GenerationBatchSize = Field(16, description=(
        "Generation batch size (>= 1), or auto: sized to the free GPU memory (as eval.batch_size; "
        f"{CPU_AUTO_BATCH} off a GPU)."))
    judge: str = Field("refusal-v1", description="Refusal judge that filters the built safety set.")


class ScoreConfig(FrozenConfig):
    """Stage ``scores``: importance scores of every linear weight on each set in ``sets``, written to
    ``scores/<set>-<method>/scores.safetensors`` (see :mod:`brittle.scoring` for the definitions)."""

    sets: list[str] = Field(default_factory=lambda: ["safety", "utility"], description=(
        "Sets of data.sets to score, each into its own folder; the groups stage reads \"safety\" and \"utility\"."))
    method: Literal["snip", "wanda", "snip-summed"] = Field(
        "snip", description="snip | wanda | snip-summed (|W * sum_n g_n|, not the paper's SNIP).")
    nsamples: int = Field(128, gt=0, description="Examples drawn (seeded) from each set.")
    batch_size: int = Field(4, gt=0, description="Examples per forward/backward pass.")
    max_length: int = Field(512, gt=0, description="Tokens kept per example (prompt + response).")
    max_accumulator_gb: float | None = Field(
        None, gt=0, description="Split the modules over several passes to keep the fp32 accumulators under this size.")
    accumulators: Literal["auto", "device", "host"] = Field("auto", description=(
        "Where the fp32 accumulators live when the model is on a GPU: 'device' (split over passes when they do not "
        "fit), 'host' (CPU memory, one pass; each batch's contribution is added there), 'auto' (the memory plan "
        "decides by estimated cost). Changes the scores only by fp32 summation order, so it is not part of the "
        "stage's record."))
    gradient_checkpointing: bool = Field(False, description=(
        "SNIP: keep only each decoder block's input from the forward pass and recompute the block in the backward "
        "pass, taking the scored modules' inputs then: activation memory of one block instead of all, about a third "
        "more compute, the same scores (not part of the stage's record)."))


class GroupsConfig(FrozenConfig):
    """Stage ``groups``: top safety / top utility (``top``), the set difference S(p, q) and its random and
    magnitude-matched random controls, in ``scope`` (see :mod:`brittle.groups`); plus, when the run has an
    ablation stage, the groups of every sweep point under ``groups/sweep/``."""

    top: Fraction = Field(0.01, description="Fraction for top_safety / top_utility (0 < x <= 1).")
    p: Fraction = Field(0.05, description="Set difference: top-p utility fraction removed.")
    q: Fraction = Field(0.05, description="Set difference: top-q safety fraction kept.")
    scope: Literal["row", "matrix", "global"] = Field("matrix", description="Selection scope: row | matrix | global.")
    bins: int = Field(10, gt=0, description="|W| quantile bins of the magnitude-matched control.")
    magnitude: bool = Field(True, description="Build random_magnitude (needs the model's weights).")
    # score files to use instead of the scores stage's outputs (same model, same modules)
    safety_scores: Path | None = Field(None, description="Safety score file (instead of the scores stage's).")
    utility_scores: Path | None = Field(None, description="Utility score file (instead of the scores stage's).")

    @field_validator("top", "p", "q")
    @classmethod
    def _check_fraction(cls, v: float, info) -> float:
        return _fraction(v, info.field_name)


def _listed_once(values, what: str, shown=None):
    """``values`` unchanged, or a ValueError naming the ``what`` listed twice (``shown``: how the list is printed)."""
    if len(set(values)) != len(values):
        raise ValueError(f"a {what} is listed twice: {shown if shown is not None else list(values)}")
    return values


class AblationConfig(FrozenConfig):
    """Stage ``ablation``: remove each group kind at each (p, q) point, evaluate with ``eval`` (the lighter
    sweep evaluation, :class:`~brittle.evaluation.config.SweepEvalConfig`), write ``ablation/ablation.csv``."""

    sparsities: tuple[Fraction, ...] = Field(DEFAULT_SPARSITIES, description="Fractions q (top-q safety) of the sweep.")
    p: Fraction | None = Field(None, description="Utility fraction removed from the set difference (default p = q).")
    pq: str | list[tuple[Fraction, Fraction]] | None = Field(
        None, description=f"Set-difference (p, q) pairs instead of sparsities/p: [[p, q], ...] or a preset ({', '.join(PQ_PRESETS)}).")
    kinds: tuple[Literal["top_safety", "set_difference", "random", "random_magnitude", "bottom_safety"], ...] = Field(
        GROUP_KINDS, description="Groups removed at each point: top-q safety, S(p, q), and random / magnitude-matched "
                                 "random controls of the set difference's size per module; bottom_safety (not by "
                                 "default): the bottom-q safety entries (bottom-up pruning, as many as top-q safety).")
    recover_from: str | None = Field(None, description=(
        "A model (preset, Hub id, directory; same modules and shapes) whose weights replace the removed entries "
        "instead of zeros (the paper's recovery from the base model); unset: zeros."))
    eval: SweepEvalConfig = SweepEvalConfig()

    @field_validator("kinds")
    @classmethod
    def _check_kinds(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("give at least one group kind")
        return _listed_once(v, "kind")

    @field_validator("sparsities")
    @classmethod
    def _check_sparsities(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("give at least one sparsity")
        return tuple(_fraction(x, "sparsity") for x in v)

    @field_validator("p")
    @classmethod
    def _check_p(cls, v: float | None) -> float | None:
        return None if v is None else _fraction(v, "p")

    @field_validator("pq")
    @classmethod
    def _check_pq(cls, v):
        if isinstance(v, str) and v not in PQ_PRESETS:
            raise ValueError(f"unknown (p, q) preset '{v}' (known: {', '.join(PQ_PRESETS)}), or give [[p, q], ...]")
        if isinstance(v, list):
            if not v:
                raise ValueError("give at least one (p, q) pair")
            v = [(_fraction(p, "p"), _fraction(q, "q")) for p, q in v]
        return v

    def points(self) -> list[tuple[float, float]]:
        """The (p, q) pairs of the sweep: ``pq`` if given, else q = each sparsity and p = ``p`` (default q)."""
        if self.pq is not None:
            return list(PQ_PRESETS[self.pq]) if isinstance(self.pq, str) else list(self.pq)
        return [(s if self.p is None else self.p, s) for s in self.sparsities]


def _rank(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (a number of directions), got {value!r}")
    return value


class LowrankConfig(FrozenConfig):
    """Stage ``lowrank`` (ActSVD, :mod:`brittle.lowrank`): per linear module, remove the top-``r`` output
    directions of the safety calibration set (``top_safety``) or a random ``r``-dimensional output subspace
    (``random``, the control) for each rank of ``ranks``, and the safety directions outside the utility subspace
    (``orthogonal``, ``W - (I - P_u) P_s W``) for each ``[r_utility, r_safety]`` pair of ``orthogonal``; evaluate
    each with ``eval`` (the sweep evaluation of the ablation) -> ``lowrank/lowrank.csv``. Ranks are the projector
    ranks themselves (not the seed code's complements); each must be at most ``min(d_out, d_in)`` of every
    targeted module (``r_utility`` below ``d_out``), checked against the model before anything changes. The
    covariances come from the data stage's ``safety``/``utility`` sets, ``scores.nsamples`` examples drawn with the
    run's seed, at ``scores.batch_size`` and ``scores.max_length`` (the weight-level scores' calibration sample)."""

    ranks: tuple[int, ...] = Field((1, 4, 16, 64), description="Ranks r of the top_safety and random rows.")
    orthogonal: list[tuple[int, int]] = Field(
        default_factory=lambda: [(64, 16)], description="[r_utility, r_safety] pairs of the orthogonal rows ([] for none).")
    targets: tuple[str, ...] = Field(("all",), description="Roles edited (q, k, v, o, gate, up, down ...) or all.")
    eval: SweepEvalConfig = SweepEvalConfig()

    @field_validator("ranks", mode="before")
    @classmethod
    def _check_ranks(cls, v):
        v = tuple(v) if isinstance(v, (list, tuple)) else v
        if v == ():
            raise ValueError("give at least one rank")
        if isinstance(v, tuple):
            v = _listed_once(tuple(_rank(r, "a rank") for r in v), "rank")
        return v

    @field_validator("orthogonal", mode="before")
    @classmethod
    def _check_pairs(cls, v):
        if isinstance(v, (list, tuple)):
            out = []
            for pair in v:
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise ValueError(f"give [r_utility, r_safety] pairs, got {pair!r}")
                out.append((_rank(pair[0], "r_utility"), _rank(pair[1], "r_safety")))
            return _listed_once(out, "pair", [list(x) for x in out])
        return v

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("give at least one role (or all)")
        if "all" in v and len(v) > 1:
            raise ValueError(f"'all' already covers every role, got {list(v)}")
        bad = [t for t in v if not re.fullmatch(r"[A-Za-z_][\w]*", t)]
        if bad:
            raise ValueError(f"roles are names such as q, k, v, o, gate, up, down (or all), got {bad}")
        return _listed_once(v, "role")

    def max_ranks(self) -> dict[str, int]:
        """The most directions needed per set: ``{"safety": ..., "utility": ...}`` (0 = not needed)."""
        return {"safety": max((*self.ranks, *(s for _, s in self.orthogonal))),
                "utility": max((u for u, _ in self.orthogonal), default=0)}


class OverlapConfig(FrozenConfig):
    """Stage ``overlap`` (Experiment 1): the run's groups against the same selection on another calibration
    sample of the unchanged model (the noise floor, sub-run ``noise/``) and on the fine-tuned model (sub-run
    ``refit/``: the finetune stage's merged weights, scored on the run's own calibration sample)."""

    groups: tuple[str, ...] = Field(("top_safety", "top_utility", "set_difference"),
                                    description="Groups compared (names of the groups stage's files).")
    noise_floor: bool = Field(True, description="Compute the noise floor (scores and groups on the examples of "
                                                "each data set that the run's scores did not use).")
    finetuned: bool = Field(True, description="Compare with the groups of the fine-tuned model (needs the "
                                              "finetune stage with merge = true or full = true).")
    n_boot: int = Field(2000, gt=0, description="Bootstrap resamples of the per-module Jaccard differences.")
    finetune: str | None = Field(None, description="Which fine-tuning (a name of finetune.variants; default: the "
                                                    "run's only one).")


class StatsConfig(FrozenConfig):
    """Stage ``stats`` (Experiment 2): the finetune stage's final drift per tracked group, each group against
    its controls (see :mod:`brittle.analysis.stats`), and the verdict on the primary comparison."""

    pairs: tuple[tuple[str, str], ...] = Field(
        (("set_difference", "random_magnitude"), ("set_difference", "random"), ("set_difference", "top_utility"),
         ("top_safety", "random_magnitude"), ("top_safety", "random")),
        description="(group, control) comparisons; pairs whose groups were not tracked are skipped.")
    metrics: tuple[Literal["abs", "rel", "row_cosine", "row_l2"], ...] = Field(
        ("abs", "rel", "row_cosine", "row_l2"),
        description="abs = |Delta|, rel = |Delta|/|w0| (per entry); row_cosine, row_l2 (per output row).")
    max_n: int = Field(20000, gt=1, description="Entries per side (deterministic subsample) of each comparison.")
    n_boot: int = Field(1000, gt=0, description="Bootstrap resamples of each effect size.")
    margin: float = Field(0.147, gt=0, lt=1, description="Equivalence margin / H1 threshold on Cliff's delta.")
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level (Benjamini-Hochberg adjusted p).")
    finetune: str | None = Field(None, description="Which fine-tuning's drift (a name of finetune.variants; "
                                                    "default: the run's only one).")


class ExperimentConfig(BaseSettings):
    """A run: the model, the seed, the stages to run (always in the order of ``STAGES``) and one section per
    stage. With an ``align`` stage, the stages after it work on the aligned model (``align.base`` is the model
    it starts from; ``model`` is then not used)."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)
    toml_file: ClassVar[Path | None] = None  # set by load_config for the duration of one load

    model: str = Field("smollm2-135m-safe", description="Preset name, Hub id, local HF directory or .gguf file.")
    seed: int = Field(0, description="Random seed (sampling, splits, random controls, generation).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Model dtype (scores are accumulated in float32 anyway).")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ... or auto (accelerate's device_map: a model "
                               "too large for one GPU spread over the GPUs, then the CPU); default: where the model loads.")
    stages: tuple[StageName, ...] = Field(("data", "scores", "groups", "ablation"),
                                          description=f"Stages to run, in order ({', '.join(STAGES)}).")
    align: AlignConfig = AlignConfig()
    data: DataConfig = DataConfig()
    scores: ScoreConfig = ScoreConfig()
    groups: GroupsConfig = GroupsConfig()
    ablation: AblationConfig = AblationConfig()
    lowrank: LowrankConfig = LowrankConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    overlap: OverlapConfig = OverlapConfig()
    stats: StatsConfig = StatsConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("stages")
    @classmethod
    def _ordered(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(_listed_once(v, "stage"), key=STAGES.index))

    @model_validator(mode="after")
    def _one_seed(self) -> ExperimentConfig:
        # The experiment's seed is the seed of every stage; a different seed inside an evaluation section
        # would silently be replaced, so it is an error.
        sections = (("eval", self.eval), ("ablation.eval", self.ablation.eval), ("lowrank.eval", self.lowrank.eval),
                    ("finetune.eval", self.finetune.eval), ("finetune.train", self.finetune.train))
        for name, section in sections:
            if section.seed not in (0, self.seed):
                raise ValueError(f"{name}.seed = {section.seed}: set the experiment's top-level seed instead")
        return self

    @model_validator(mode="after")
    def _analyses_have_inputs(self) -> ExperimentConfig:
        # Checked when the config loads, so that a run does not fine-tune for an hour and then fail.
        if "lowrank" in self.stages and "data" not in self.stages:
            raise ValueError("the lowrank stage records its covariances on the run's calibration sets: add the data "
                             "stage")
        if "overlap" in self.stages:
            missing = [s for s in ("data", "scores", "groups") if s not in self.stages]
            if missing:
                raise ValueError(f"the overlap stage compares the run's groups: add the stages {', '.join(missing)}")
            if self.overlap.finetuned:
                if "finetune" not in self.stages:
                    raise ValueError("overlap.finetuned needs the finetune stage (with merge = true), or set "
                                     "overlap.finetuned = false")
                job = self.finetune.jobs()[self.finetune_job_name(self.overlap.finetune, "overlap.finetune")]
                if not (job.merge or job.full):
                    raise ValueError("overlap.finetuned needs a fine-tuning with finetune.merge = true (or full = "
                                     "true): the overlap re-scores the merged model; or set overlap.finetuned = false")
        if "stats" in self.stages:
            if "finetune" not in self.stages:
                raise ValueError("the stats stage compares the drift of tracked groups: add the finetune stage (with "
                                 "finetune.track naming the groups, or its default: the run's groups)")
            if self.finetune.jobs()[self.finetune_job_name(self.stats.finetune, "stats.finetune")].track == []:
                raise ValueError("the stats stage needs tracked groups: the fine-tuning it reads has track = []")
        return self

    def finetune_job_name(self, name: str | None, what: str) -> str:
        """The variant an analysis reads (``""`` = the only fine-tuning, without variants); errors name ``what``."""
        jobs = self.finetune.jobs()
        if name is None:
            if len(jobs) > 1:
                raise ValueError(f"{what}: the run has {len(jobs)} fine-tunings ({', '.join(jobs)}); name one")
            return next(iter(jobs))
        if name not in jobs:
            raise ValueError(f"{what} = '{name}': no such fine-tuning (finetune.variants: {', '.join(jobs) or 'none'})")
        return name

    def eval_config(self, section: EvalConfig) -> EvalConfig:
        """An evaluation section with the experiment's seed."""
        return section.model_copy(update={"seed": self.seed})

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings: PydanticBaseSettingsSource, env_settings,
                                   dotenv_settings, file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        # Overrides (init kwargs) win over the file; environment variables are deliberately not a source:
        # a run is described by its config file and command line alone.
        if cls.toml_file is None:
            return (init_settings,)
        return (init_settings, TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_file))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------------
# Loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"groups.p=0.1"`` -> ``(["groups", "p"], 0.1)``; the value is read as TOML (a bare word is a string)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
        raise ConfigError(f"--set expects section.key=value (e.g. groups.p=0.1), got '{text}'")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def overrides_dict(pairs: Iterable[tuple[Sequence[str], Any]]) -> dict[str, Any]:
    """Nested dict from ``(path, value)`` pairs (later pairs win)."""
    out: dict[str, Any] = {}
    for path, value in pairs:
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {'.'.join(path)}: '{part}' is a value, not a section")
        node[path[-1]] = value
    return out


def _pairs(options: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """A nested dict as ``(path, value)`` pairs (the inverse of :func:`overrides_dict`)."""
    out: list[tuple[tuple[str, ...], Any]] = []
    for k, v in options.items():
        out += _pairs(v, (*prefix, k)) if isinstance(v, Mapping) and v else [((*prefix, k), v)]
    return out


def _model_at(path: Sequence[str | int]) -> type[BaseModel] | None:
    """The config model that holds the key at ``path`` (for listing the allowed keys)."""
    model: type[BaseModel] | None = ExperimentConfig
    for part in path[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _toml_line(path: Path | None, loc: Sequence[str | int]) -> str:
    """``file:line`` of ``loc``'s key in the TOML file when it can be found by a text search."""
    if path is None or not loc:
        return ""
    section, key = ".".join(str(x) for x in loc[:-1]), str(loc[-1])
    current = ""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        header = re.fullmatch(r"\[\s*([^\]]+?)\s*\]", stripped)
        if header:
            current = header.group(1)
        elif current == section and re.match(rf"{re.escape(key)}\s*=", stripped):
            return f"{path}:{n}: "
        elif not current and re.match(rf"{re.escape('.'.join(str(x) for x in loc))}\s*=", stripped):
            return f"{path}:{n}: "
    return f"{path}: "


def _describe(error: ValidationError, toml_file: Path | None) -> str:
    lines = []
    for e in error.errors():
        loc = [x for x in e["loc"] if not isinstance(x, int)]
        key = ".".join(str(x) for x in loc)
        where = _toml_line(toml_file, loc)
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            allowed = ", ".join(owner.model_fields) if owner else "?"
            section = ".".join(str(x) for x in loc[:-1]) or "top level"
            lines.append(f"{where}unknown key '{key}' (allowed in {section}: {allowed})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "got " not in msg and loc:
                msg += f" (got {json.dumps(e.get('input'), default=str)})"
            lines.append(f"{where}{key or 'config'}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, sets: Iterable[str] = (),
                options: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """The experiment config of a TOML file (or the defaults when ``path`` is None), then the ``--set``
    overrides (``section.key=value`` strings), then ``options`` (a nested dict: the CLI's given options)."""
    toml_file = None
    if path is not None:
        toml_file = Path(path)
        if not toml_file.is_file():
            raise ConfigError(f"config file not found: {toml_file}")
        try:
            tomllib.loads(toml_file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{toml_file}: not valid TOML: {e}") from None
    init = overrides_dict([*(parse_override(o) for o in sets), *_pairs(options or {})])
    ExperimentConfig.toml_file = toml_file
    try:
        return ExperimentConfig(**init)
    except ValidationError as e:
        raise ConfigError(_describe(e, toml_file)) from None
    finally:
        ExperimentConfig.toml_file = None


def dump_toml(cfg: BaseModel) -> str:
    """A TOML rendering of a config (for ``brittle run --print-config``): top-level keys, then one table per
    section; ``None`` values are left out (TOML has no null: a missing key means the default ``None``)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items() if x is not None) + " }"
        raise TypeError(type(v))

    def table(name: str, data: dict[str, Any]) -> list[str]:
        scalars = [f"{k} = {value(v)}" for k, v in data.items()
                   if v is not None and not (isinstance(v, dict) and k in sections(data))]
        out = ([f"[{name}]"] if name else []) + scalars
        for k in sections(data):
            out += ["", *table(f"{name}.{k}" if name else k, data[k])]
        return out

    def sections(data: dict[str, Any]) -> list[str]:
        return [k for k, v in data.items() if isinstance(v, dict) and k not in ("sets",)]

    return "\n".join(table("", cfg.model_dump(mode="json"))) + "\n"


def shipped_configs() -> dict[str, Path]:
    """The configs that ship with brittle (``configs/`` in the repository), by name."""
    from importlib.resources import files

    root = Path(str(files("brittle") / "resources" / "configs"))
    return {p.stem: p for p in sorted(root.glob("*.toml"))}


def shipped_config(name_or_path: str | Path) -> Path:
    """A config file path, or the name of a shipped config (``ablation``) -> its path."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise ConfigError(f"config file not found: {path} (shipped configs: {', '.join(shipped) or 'none'})")


# --------------------------------------------------------------------------------------------------
# The reference of every key (docs/config.md)

#: The command that writes docs/config.md (run in the repository root; a test checks the file is current).
REFERENCE_COMMAND = ("python -c \"from brittle.config import reference_markdown; print(reference_markdown(), end='')\""
                     " > docs/config.md")

#: The section whose table documents the keys of every evaluation section (they share EvalConfig's fields).
_EVAL_HOME = "eval"

#: What a section is for, where its class docstring does not say it (shown before the docstring's first paragraph).
_ROLES = {
    "align": "Stage `align`: the safety fine-tuning recipe applied to `align.base`, saved as `align/`; the stages "
             "after it use that model instead of `model`.",
    "align.lora": "The LoRA training of the recipe (part of its hash, so of the cached organism's name).",
    "ablation.eval": "The evaluation of the dense model and of every point of the ablation sweep "
                     "(`ablation/eval/<label>/`).",
    "lowrank.eval": "The evaluation of the dense model and of every point of the low-rank sweep.",
    "finetune.eval": "The evaluation before and after fine-tuning (`eval/before/`, `eval/after/` of the stage "
                     "folder; when `finetune.evaluate = true`).",
    "eval": "Stage `eval`: the evaluation suite on the run's model, written to `eval/` (`summary.json`, "
            "`generations/`).",
}


def _prose(doc: str | None) -> str:
    """The first paragraph of a docstring as one line of Markdown (Sphinx roles and ````literals```` as code)."""
    para = inspect.cleandoc(doc or "").split("\n\n")[0]
    text = " ".join(para.split())
    text = re.sub(r":\w+:`(~?)([^`]+)`", lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`",
                  text)
    return re.sub(r"``(.+?)``", r"`\1`", text)


def _md(text: str, *, cell: bool = False) -> str:
    """``text`` escaped for Markdown: ``<`` and ``*`` outside code spans (no HTML, no emphasis), ``|`` in a table."""
    parts = re.split(r"(`[^`]*`)", text)
    for i, part in enumerate(parts):
        if i % 2 == 0:
            part = re.sub(r"([<*])", r"\\\1", part)
        parts[i] = part.replace("|", r"\|") if cell else part
    return "".join(parts)


def _type_name(ann: Any) -> str:
    """A field's type as a config file sees it: ``int``, ``str | None``, ``list[str]``, ``"row" | "matrix"``."""
    origin, args = get_origin(ann), get_args(ann)
    if ann is type(None):
        return "None"
    if ann is Any:
        return "any"
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return "[" + ", ".join(_type_name(a) for a in args) + "]"  # a fixed-length array
    if origin in (list, tuple):
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return "table of " + ("tables" if get_origin(args[1]) is dict else _type_name(args[1]))
    if isinstance(ann, type) and issubclass(ann, PurePath):
        return "path"
    return getattr(ann, "__name__", str(ann))


def _toml_value(v: Any) -> str:
    """A JSON-mode value as TOML writes it (``None``: ``unset``; TOML has no null)."""
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        items = [f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', k) else json.dumps(k)} = {_toml_value(x)}"
                 for k, x in v.items() if x is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise TypeError(type(v))


def _code(text: str) -> str:
    return "`" + text.replace("|", r"\|") + "`"


def _default_cell(v: Any) -> str:
    return "unset" if v is None else _code(_toml_value(v))


def _is_section(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _leaf_rows(cls: type[BaseModel], values: Mapping[str, Any], prefix: str) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        if not _is_section(field.annotation):
            rows.append(f"| {_code(prefix + name)} | {_code(_type_name(field.annotation))} | "
                        f"{_default_cell(values[name])} | {_md(field.description or '', cell=True)} |")
    return rows


def _eval_sections(cls: type[BaseModel], values: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[type, Any]]:
    """Every evaluation section below ``cls``: dotted path -> (class, default values)."""
    out: dict[str, tuple[type, Any]] = {}
    for name, field in cls.model_fields.items():
        if _is_section(field.annotation):
            if issubclass(field.annotation, EvalConfig):
                out[prefix + name] = (field.annotation, values[name])
            else:
                out |= _eval_sections(field.annotation, values[name], f"{prefix}{name}.")
    return out


def _eval_table(sections: Mapping[str, tuple[type, Any]]) -> list[str]:
    """One row per key of the evaluation sections, a default column per distinct set of defaults (the home section's
    first)."""
    home_cls = sections[_EVAL_HOME][0]
    columns: dict[str, list[str]] = {}  # defaults (JSON) -> sections
    for path in sorted(sections, key=lambda p: p != _EVAL_HOME):
        columns.setdefault(json.dumps(sections[path][1], sort_keys=True), []).append(path)
    for path, (cls, _) in sections.items():
        for name, field in home_cls.model_fields.items():
            other = cls.model_fields[name]
            if (other.annotation, other.description) != (field.annotation, field.description):
                raise ValueError(f"{path}.{name}: type or description differs from {_EVAL_HOME}.{name}")
    heads = ["default in " + ", ".join(f"`[{p}]`" for p in paths) for paths in columns.values()]
    rows = ["| key | type | " + " | ".join(heads) + " | meaning |", "|---|---|" + "---|" * len(heads) + "---|"]
    for name, field in home_cls.model_fields.items():
        defaults = " | ".join(_default_cell(sections[paths[0]][1][name]) for paths in columns.values())
        rows.append(f"| {_code(f'{_EVAL_HOME}.{name}')} | {_code(_type_name(field.annotation))} | {defaults} | "
                    f"{_md(field.description or '', cell=True)} |")
    return rows


def _section(path: str, cls: type[BaseModel], values: Mapping[str, Any], level: int,
             evals: Mapping[str, tuple[type, Any]], introduced: dict[type, str]) -> list[str]:
    lines = ["#" * level + f" `[{path}]`", ""]
    intro = [_ROLES[path]] if path in _ROLES else []
    if cls in introduced:
        intro.append(f"`{cls.__name__}`, as `[{introduced[cls]}]`.")
    else:
        introduced[cls] = path
        prose = _prose(cls.__doc__)
        intro.append(f"`{cls.__name__}`: {prose[:1].lower()}{prose[1:]}" if issubclass(cls, EvalConfig) else prose)
    if path in evals and path != _EVAL_HOME:
        intro.append(f"Its keys are those of every evaluation section: see the table under `[{_EVAL_HOME}]` (read "
                     f"`{path}.` for `{_EVAL_HOME}.`; this section's defaults are in the column that names it).")
        return [*lines, _md(" ".join(intro)), ""]
    if path == "finetune":
        intro.append(f"With `data = \"attack\"`, `n_examples` defaults to {ATTACK_DEFAULTS['n_examples']} and "
                     f"`train.epochs` to {ATTACK_DEFAULTS['epochs']} (unless `train.max_steps` is given).")
    lines += [_md(" ".join(intro)), ""]
    if path == _EVAL_HOME:
        others = [p for p in evals if p != _EVAL_HOME]
        lines += [_md(f"The same keys make up {', '.join(f'`[{p}]`' for p in others)}: `{_EVAL_HOME}.x` below "
                      f"stands for each section's `x`, with the defaults of the column that names the section. A count "
                      f"of 0 (or `tasks = []`) skips that part; its summary entries are then null."), "",
                  *_eval_table(evals), ""]
        return lines
    lines += [*_leaf_rows(cls, values, path + "."), ""]
    for name, field in cls.model_fields.items():
        if _is_section(field.annotation):
            lines += _section(f"{path}.{name}", field.annotation, values[name], level + 1, evals, introduced)
    if path == "finetune":
        lines += ["#" * (level + 1) + " `[finetune.variants]`", "",
                  _md("Several fine-tunings in one run: each entry `name = { key = value, ... }` is a fine-tuning "
                      "with the keys of this `[finetune]` section, the given ones changed (nested tables such as "
                      "`train` merged key by key), written to `finetune/<name>/` instead of `finetune/`. Only keys "
                      "given in the file or by `--set` are inherited, so a variant with `data = \"attack\"` gets the "
                      "attack's own defaults; a variant has no variants of its own. `overlap.finetune` and "
                      "`stats.finetune` name the variant they read (required when there are several). Without "
                      "entries (the default `{}`) the run has one fine-tuning, in `finetune/`. From the `demo` "
                      "config:"), "",
                  "```toml", "[finetune.variants]",
                  'frozen = { freeze = "set_difference", merge = true }   # Experiment 1',
                  "free = {}                                              # Experiment 2", "```", ""]
    return lines


def reference_markdown() -> str:
    """The reference of every config key (``docs/config.md``), generated from the config models: how a config is
    written and overridden, the shipped configs, then per section its purpose and a table of its keys (full dotted
    key, type, default as TOML writes it, meaning: the field's description). The evaluation sections share one
    table, with a default column per distinct set of defaults."""
    values = ExperimentConfig().model_dump(mode="json")
    shipped = {name: load_config(path) for name, path in shipped_configs().items()}
    stage_list = ", ".join(f"`{s}`" for s in STAGES)
    lines = [
        f"<!-- Generated from the config models by: {REFERENCE_COMMAND} (do not edit; tests/test_config.py checks "
        "it) -->",
        "",
        "# Configuration reference",
        "",
        _md("A run of brittle is described by one TOML file: the top-level keys, then one table per stage section "
            "(`[data]`, `[groups]`, ...) and its sub-sections (`[ablation.eval]`, `[finetune.train]`, ...). A key "
            "that is not written has the default below; TOML has no null, so a default shown as \"unset\" is the "
            "key's absence (write a value to set it). The tables are generated from the config models "
            "(`brittle.config.ExperimentConfig` and the models it composes): the meaning of a key is its field's "
            "description."),
        "",
        _md("- `brittle run FILE` runs a config (a file, or the name of a shipped one); `brittle run FILE "
            "--print-config` prints every key with its resolved value, as TOML."),
        _md("- `--set section.key=value` (repeatable) overrides one key and wins over the file, e.g. "
            "`brittle run ablation --set groups.p=0.1 --set ablation.sparsities=[0.01,0.02]`. The value is read as "
            "TOML (`0.1`, `true`, `[0.01, 0.02]`, `\"text\"`); a bare word is a string. The options of the other "
            "commands (`brittle groups --p 0.1`, ...) set the same keys (their `--help` shows the defaults)."),
        _md("- Unknown keys and invalid values are errors that name the key, the file and line, and the allowed keys "
            "or values; nothing runs."),
        _md(f"- `stages` names the stages to run, each at most once; they always run in pipeline order, whatever "
            f"the order given: {stage_list}. `report` has no section."),
        "",
        "Shipped configs (`configs/NAME.toml`, installed with the package: `brittle run NAME` finds them):",
        "",
        "| config | model | stages |",
        "|---|---|---|",
        *(f"| `{name}` | `{cfg.model}` | {', '.join(cfg.stages)} |" for name, cfg in shipped.items()),
        "",
        "## Top level",
        "",
        _md(_prose(ExperimentConfig.__doc__)),
        "",
        *_leaf_rows(ExperimentConfig, values, ""),
        "",
    ]
    evals = _eval_sections(ExperimentConfig, values)
    introduced: dict[type, str] = {}
    for name, field in ExperimentConfig.model_fields.items():
        if _is_section(field.annotation):
            lines += _section(name, field.annotation, values[name], 2, evals, introduced)
    return "\n".join(lines).rstrip("\n") + "\n"
