"""A study spec (YAML) → typed, frozen objects; every check of user input lives here.

The spec is read once, validated completely, and refused with one message naming the file,
the key path, the rule and the value before any trial runs.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote, unquote_plus

from hpsearch.errors import SpecError
from hpsearch.knobs import KNOBS, PER_LAYER
from hpsearch.spec_file import read_yaml
from hpsearch.vocab import (DATASETS, DEFAULT_METRIC, DEVICE_RULE, DIRECTIONS, FAMILIES, FAMILY_TASKS, MASK_PLACEMENTS,
                            METRICS, NOISE_KINDS, PRECISIONS, PRUNERS, SAMPLERS, STATIC_METRICS, TASKS, is_device)

# Options hpsearch sets itself, so a spec may not.
_RESERVED_SAMPLER_OPTIONS = {"seed", "search_space"}
_RESERVED_PRUNER_OPTIONS = {"wrapped_pruner"}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")
_TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "file", "http", "https")


# --------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class MetricSpec:
    name: str
    direction: str


@dataclass(frozen=True)
class SamplerSpec:
    type: str = "tpe"  # TPE: the best general default for mixed, conditional spaces
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrunerSpec:
    type: str = "median"  # median: robust, no tuning, prunes from the 2nd epoch of later trials
    options: Mapping[str, Any] = field(default_factory=dict)
    wrapped: PrunerSpec | None = None  # for `patient`


@dataclass(frozen=True)
class RefitSpec:
    """How the final model is made (hpsearch/refit.py): the best configuration retrained on train + val."""

    enabled: bool = True  # the validation split has done its job once the search has chosen: train on it too
    epochs: str | int = "best"  # "best": where the best trial's validation curve peaked; or a fixed count
    data: str = "train+val"  # the one choice today; named so that the record says what the model saw


@dataclass(frozen=True)
class StopSpec:
    """Study-wide stop rules (hpsearch/stopping.py); each None is a rule not in force."""

    target: float | None = None  # stop once a complete trial's first metric reaches this value
    patience: int | None = None  # stop after this many finished trials in a row without improvement
    min_delta: float = 0.0  # an improvement smaller than this does not count (for `patience`)
    max_minutes: float | None = None  # stop this long after the study's first trial started

    @property
    def active(self) -> bool:
        return self.target is not None or self.patience is not None or self.max_minutes is not None


@dataclass(frozen=True)
class WarmStartSpec:
    """An earlier study to start from (hpsearch/warmstart.py)."""

    study: str
    storage: str  # resolved; this study's storage unless given
    top_k: int = 3  # its best configurations, evaluated first here: a few, not a copy of the old search


@dataclass(frozen=True)
class StudySpec:
    name: str
    metrics: tuple[MetricSpec, ...]
    n_trials: int  # the study's total, however many workers share it
    storage: str  # an Optuna storage URL, resolved (never printed with its password)
    timeout: float | None = None  # seconds per worker; None: run until n_trials
    seed: int = 0  # sampler seed; each trial's training seed derives from it and the trial number
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    enqueue: tuple[Mapping[str, Any], ...] = ()  # known-good configurations, evaluated first
    heartbeat_interval: int = 10  # seconds between a running trial's heartbeats
    grace_period: int = 60  # a trial silent this long is failed (its worker died) and retried
    max_retries: int = 2  # how often a trial whose worker died is retried with the same params
    refit: RefitSpec = field(default_factory=RefitSpec)  # off by default for multi-objective studies (see parse)
    stop: StopSpec = field(default_factory=StopSpec)  # no rule by default: the study runs to n_trials
    warm_start: WarmStartSpec | None = None  # start from nothing unless asked

    @property
    def directions(self) -> list[str]:
        return [m.direction for m in self.metrics]

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1


@dataclass(frozen=True)
class NoiseSpec:
    kind: str = "gaussian"
    std: float = 0.3  # gaussian std in [0, 1] pixel units: visibly noisy, still legible
    amount: float = 0.1  # salt-and-pepper: share of pixels flipped to 0 or 1


@dataclass(frozen=True)
class MaskSpec:
    size: int = 14  # a quarter of a 28x28 digit: enough to hide a stroke
    placement: str = "center"


@dataclass(frozen=True)
class TaskSpec:
    type: str
    dataset: str
    fallback: str | None = None  # a dataset to use, loudly, when `dataset` cannot be loaded
    data_dir: str | None = None
    val_fraction: float = 0.1  # carved from the training split with the study seed
    train_limit: int | None = None  # cap on train+val samples, for quick studies
    epochs: int = 10
    batch_size: int = 128
    device: str = "auto"
    normalize: bool = True  # standardise inputs with the training split's mean and std
    noise: NoiseSpec = field(default_factory=NoiseSpec)
    mask: MaskSpec = field(default_factory=MaskSpec)
    threads: int | None = None  # CPU threads per trial; None: the machine's cores / workers
    precision: str = "fp32"  # "bf16": bfloat16 autocast for the forward passes (fast on GPUs)
    channels_last: bool | None = None  # conv memory layout; None: on for conv models on CUDA
    # Validation reports (and pruning decisions) per epoch; None ("auto"): one per ~10,000 training
    # images, at least one, so a hopeless trial on a large dataset is judged before its first epoch ends.
    reports_per_epoch: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    family: str


@dataclass(frozen=True)
class ParamSpec:
    """One entry of the search space."""

    name: str
    type: str  # "int" | "float" | "categorical" | "fixed"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None
    per_layer: bool = False
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def possible(self, value: Any) -> bool:
        """Return whether this parameter can take ``value``."""
        if self.type == "fixed":
            return value == self.value
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high  # type: ignore[operator]

    def smallest(self) -> Any:
        """Return the smallest value this parameter can take."""
        return self.value if self.type == "fixed" else min(self.choices) if self.type == "categorical" else self.low

    def largest(self) -> Any:
        """Return the largest value this parameter can take."""
        return self.value if self.type == "fixed" else max(self.choices) if self.type == "categorical" else self.high


@dataclass(frozen=True)
class TrackingSpec:
    enabled: bool = True
    uri: str = ""  # resolved MLflow tracking URI
    artifact_root: str | None = None  # where a local store keeps artifacts
    experiment: str = ""
    log_images_every: int = 1  # epochs between reconstruction grids (and always at the end)
    register_model: bool = True
    system_metrics: bool = False  # MLflow's CPU/memory/GPU sampling on each trial run: a thread per worker


@dataclass(frozen=True)
class Spec:
    path: str
    study: StudySpec
    task: TaskSpec
    model: ModelSpec
    space: tuple[ParamSpec, ...]
    tracking: TrackingSpec
    runs_dir: str  # embedded stores, artifacts and caches live here

    def to_dict(self) -> dict[str, Any]:
        """Return the resolved spec as plain data (JSON-safe), the storage password masked."""
        data = asdict(self)
        data["study"]["storage"] = mask_password(self.study.storage)
        if self.study.warm_start is not None:
            data["study"]["warm_start"]["storage"] = mask_password(self.study.warm_start.storage)
        data["tracking"]["uri"] = mask_password(self.tracking.uri)
        return json.loads(json.dumps(data, default=str))

    def space_dict(self) -> dict[str, Any]:
        """Return what defines the search: task, model and space (used to refuse silent changes)."""
        data = self.to_dict()
        task = dict(data["task"])
        for key in ("data_dir", "device", "threads", "channels_last"):  # where and how fast, not what is searched
            task.pop(key)
        if task["precision"] == "fp32":  # the default then leaves the fingerprints of older studies as they were
            task.pop("precision")
        if task["reports_per_epoch"] is None:  # auto: decided once per study and stored (see trials.REPORTS_ATTR)
            task.pop("reports_per_epoch")
        return {"task": task, "model": data["model"], "space": data["space"],
                "metrics": data["study"]["metrics"]}

    def fingerprint(self) -> str:
        """Return a short hash of :meth:`space_dict`."""
        text = json.dumps(self.space_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def artifacts_dir(self) -> str:
        return os.environ.get("HPSEARCH_ARTIFACTS") or str(Path(self.runs_dir) / "artifacts")

    @property
    def cache_dir(self) -> str:
        return str(Path(self.runs_dir) / "cache")


# --------------------------------------------------------------------------- secrets in URLs

# A URL in a message runs to the next whitespace; its user info ends at its last "@" (so a password
# with "@", ":" or "/" in it is masked whole, and a user name such as "user@server" stays readable).
_URL_IN_TEXT = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://(\S+)")
_QUERY_PARAM = re.compile(r"([?&;])([^=&;#\s]+)=([^&;#\s]*)")
# Query parameters whose value is a secret, whatever a driver or a server calls it (password,
# sslpassword, passwd, pwd, token, access_key, api_key, secret, auth, credentials, signature, sig).
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|auth|credential|signature|^sig$", re.IGNORECASE)
_MASK = "***"


def mask_password(text: str) -> str:
    """Return ``text`` (a URL, or a message quoting URLs) with every secret a URL can carry replaced by ``***``.

    The password of the user info, however it is written (``user:pw@``, ``:pw@``, percent-escaped
    or not, with ``@``, ``:`` or ``/`` in it), a bare http(s) user info (a token), and the values of
    query parameters that look secret (``?password=...``, ``token=``, ``sslpassword=``...).
    """
    return _URL_IN_TEXT.sub(lambda m: f"{m[1]}://{_mask_url_rest(m[1], m[2])}", text)


def _mask_url_rest(scheme: str, rest: str) -> str:
    userinfo, at, host = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        if colon:
            rest = f"{user}:{_MASK}@{host}"
        elif scheme.lower() in ("http", "https"):  # https://TOKEN@host: the user name is the secret
            rest = f"{_MASK}@{host}"
    return _QUERY_PARAM.sub(
        lambda m: f"{m[1]}{m[2]}={_MASK}" if _SECRET_PARAM.search(unquote_plus(m[2])) else m[0], rest)


def url_secrets(url: str) -> set[str]:
    """Return the secrets ``url`` carries (see :func:`mask_password`), each as written, decoded and re-escaped."""
    found = set()
    for m in _URL_IN_TEXT.finditer(url):
        userinfo, at, _ = m[2].rpartition("@")
        if at:
            user, colon, password = userinfo.partition(":")
            found.add(password if colon else user if m[1].lower() in ("http", "https") else "")
        found.update(q[3] for q in _QUERY_PARAM.finditer(m[2]) if _SECRET_PARAM.search(unquote_plus(q[2])))
    forms = set()
    for secret in found:
        forms |= {secret, unquote(secret), unquote_plus(secret), quote(unquote(secret), safe=""),
                  quote_plus(unquote_plus(secret), safe="")}
    return {f for f in forms if f}


def hide_secrets(text: str, url: str) -> str:
    """Return ``text`` (e.g. a driver's error about ``url``) with ``url``'s secrets masked wherever they appear."""
    text = mask_password(text)
    for secret in sorted(url_secrets(url), key=len, reverse=True):  # longest first: no half-masked form
        text = text.replace(secret, _MASK)
    return text


def without_credentials(url: str) -> str:
    """Return ``url`` without user info or query, for a link a person opens (a browser needs neither)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    return f"{scheme}://{rest.rpartition('@')[2]}"


# --------------------------------------------------------------------------- loading


def load_spec(
    path: str | os.PathLike[str],
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    data_dir: str | None = None,
    runs_dir: str | os.PathLike[str] | None = None,
) -> Spec:
    """Return the validated spec in ``path``; keyword arguments override it (CLI flags, env).

    Raises SpecError naming the file, the key, the rule and the value for anything wrong.
    """
    path = Path(path)
    raw = read_yaml(path)
    if raw is None:
        raise SpecError(f"{path}: the spec is empty. Expected a mapping with keys study, task, model, space.")
    runs = Path(runs_dir or os.environ.get("HPSEARCH_RUNS_DIR") or "runs").resolve()
    return parse_spec(raw, source=str(path), storage=storage, tracking_uri=tracking_uri,
                      data_dir=data_dir, runs_dir=runs)


def parse_spec(
    raw: Any,
    *,
    source: str = "<spec>",
    storage: str | None = None,
    tracking_uri: str | None = None,
    data_dir: str | None = None,
    runs_dir: Path | None = None,
) -> Spec:
    """Return the validated spec built from plain data ``raw`` (as loaded from YAML)."""
    check = _Checker(source)
    raw = check.interpolate(copy.deepcopy(raw), "")
    top = check.mapping(raw, "", required=("study", "task", "model"), optional=("space", "tracking"))
    runs = Path(runs_dir or "runs").resolve()

    task = _parse_task(check, top["task"], data_dir)
    model = _parse_model(check, top["model"], task)
    space = _parse_space(check, top.get("space") or {}, model, task)
    study = _parse_study(check, top["study"], task, space, storage, runs)
    tracking = _parse_tracking(check, top.get("tracking") or {}, study, tracking_uri, runs)
    return Spec(path=source, study=study, task=task, model=model, space=space, tracking=tracking,
                runs_dir=str(runs))


def spec_from_dict(data: Mapping[str, Any]) -> Spec:
    """Return a Spec from :meth:`Spec.to_dict` output (as stored in a study)."""
    raw = {
        "study": {k: v for k, v in data["study"].items() if k not in ("metrics",)},
        "task": data["task"],
        "model": data["model"],
        "space": {p["name"]: _param_to_raw(p) for p in data["space"]},
        "tracking": {k: v for k, v in data["tracking"].items() if k != "artifact_root"},
    }
    raw["study"]["metrics"] = data["study"]["metrics"]
    raw["study"]["sampler"] = {"type": data["study"]["sampler"]["type"], **data["study"]["sampler"]["options"]}
    raw["study"]["pruner"] = _pruner_to_raw(data["study"]["pruner"])
    return parse_spec(raw, source=data.get("path", "<stored spec>"), runs_dir=Path(data["runs_dir"]))


def _param_to_raw(p: Mapping[str, Any]) -> Any:
    if p["type"] == "fixed":
        return p["value"]
    out: dict[str, Any] = {"type": p["type"]}
    if p["type"] == "categorical":
        out["choices"] = list(p["choices"])
    else:
        out.update(low=p["low"], high=p["high"], log=p["log"])
        if p["step"] is not None:
            out["step"] = p["step"]
    if p["per_layer"]:
        out["per_layer"] = True
    if p["when"]:
        out["when"] = {k: list(v) for k, v in p["when"].items()}
    return out


def _pruner_to_raw(p: Mapping[str, Any]) -> dict[str, Any]:
    out = {"type": p["type"], **p["options"]}
    if p.get("wrapped"):
        out["wrapped"] = _pruner_to_raw(p["wrapped"])
    return out


# --------------------------------------------------------------------------- sections


def _parse_task(check: _Checker, raw: Any, data_dir: str | None) -> TaskSpec:
    keys = ("type", "dataset", "fallback", "data_dir", "val_fraction", "train_limit", "epochs",
            "batch_size", "device", "normalize", "noise", "mask", "threads", "precision", "channels_last",
            "reports_per_epoch")
    m = check.mapping(raw, "task", required=("type", "dataset"), optional=keys)
    noise_raw = check.mapping(m.get("noise", {}), "task.noise", optional=("kind", "std", "amount"))
    mask_raw = check.mapping(m.get("mask", {}), "task.mask", optional=("size", "placement"))
    # The task's noise, mask and batch size are the defaults of knobs a space may search: the knobs' rules.
    noise = NoiseSpec(
        kind=check.choice(noise_raw.get("kind", "gaussian"), "task.noise.kind", NOISE_KINDS),
        std=check.knob_value(KNOBS["noise_std"], noise_raw.get("std", 0.3), "task.noise.std"),
        amount=check.knob_value(KNOBS["noise_amount"], noise_raw.get("amount", 0.1), "task.noise.amount"),
    )
    mask = MaskSpec(
        size=check.knob_value(KNOBS["mask_size"], mask_raw.get("size", 14), "task.mask.size"),
        placement=check.choice(mask_raw.get("placement", "center"), "task.mask.placement", MASK_PLACEMENTS),
    )
    fallback = m.get("fallback")
    if fallback is not None:
        fallback = check.choice(fallback, "task.fallback", DATASETS)
    val_fraction = check.number(m.get("val_fraction", 0.1), "task.val_fraction")
    if not 0.0 < val_fraction < 1.0:
        check.fail("task.val_fraction", "must be between 0 and 1 (exclusive)", val_fraction)
    limit = m.get("train_limit")
    threads = m.get("threads")
    chosen_dir = data_dir or m.get("data_dir")
    return TaskSpec(
        type=check.choice(m["type"], "task.type", TASKS),
        dataset=check.choice(m["dataset"], "task.dataset", DATASETS),
        fallback=fallback,
        data_dir=check.string(chosen_dir, "task.data_dir") if chosen_dir is not None else None,
        val_fraction=float(val_fraction),
        train_limit=None if limit is None else check.integer(limit, "task.train_limit", low=10),
        epochs=check.integer(m.get("epochs", 10), "task.epochs", low=1),
        batch_size=check.knob_value(KNOBS["batch_size"], m.get("batch_size", 128), "task.batch_size"),
        device=_device(check, m.get("device", "auto")),
        normalize=check.boolean(m.get("normalize", True), "task.normalize"),
        noise=noise,
        mask=mask,
        threads=None if threads is None else check.integer(threads, "task.threads", low=1),
        precision=check.choice(m.get("precision", "fp32"), "task.precision", PRECISIONS),
        channels_last=_channels_last(check, m.get("channels_last", "auto")),
        reports_per_epoch=_reports_per_epoch(check, m.get("reports_per_epoch", "auto")),
    )


def _device(check: _Checker, value: Any) -> str:
    if not is_device(value):
        check.fail("task.device", DEVICE_RULE, value)
    return value


def _reports_per_epoch(check: _Checker, value: Any) -> int | None:
    if value is None or value == "auto":  # None: the resolved spec's way of writing auto
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        check.fail("task.reports_per_epoch", "must be auto or a whole number of reports per epoch from 1 to 1000",
                   value)
    return value


def _channels_last(check: _Checker, value: Any) -> bool | None:
    if value is None or value == "auto":  # None: the resolved spec's way of writing auto
        return None
    if isinstance(value, bool):
        return value
    return check.fail("task.channels_last", "must be auto, true or false", value)


def _parse_model(check: _Checker, raw: Any, task: TaskSpec) -> ModelSpec:
    m = check.mapping(raw, "model", required=("family",), optional=("family",))
    family = check.choice(m["family"], "model.family", FAMILIES)
    if task.type not in FAMILY_TASKS[family]:
        check.fail("model.family", f"model family {family!r} cannot do task {task.type!r}; "
                   f"it does {list(FAMILY_TASKS[family])}", family)
    return ModelSpec(family=family)


def _parse_space(check: _Checker, raw: Any, model: ModelSpec, task: TaskSpec) -> tuple[ParamSpec, ...]:
    m = check.mapping(raw, "space", optional=tuple(KNOBS))
    params: dict[str, ParamSpec] = {}
    for name, value in m.items():
        knob = KNOBS[name]
        where = f"space.{name}"
        if model.family not in knob.families:
            check.fail(where, f"{name!r} has no effect on model family {model.family!r} "
                       f"(it applies to {list(knob.families)})", value)
        if task.type not in knob.tasks:
            check.fail(where, f"{name!r} has no effect on task {task.type!r} (it applies to {list(knob.tasks)})",
                       value)
        params[name] = _parse_param(check, name, value)
    # Conditions: explicit `when`, else the knob's implicit one when its parent is searched.
    resolved: list[ParamSpec] = []
    for name, p in params.items():
        when = dict(p.when)
        if not when and p.type != "fixed":
            for parent, values in KNOBS[name].only_when:
                parent_spec = params.get(parent)
                if parent_spec is not None and parent_spec.type != "fixed":
                    when[parent] = tuple(v for v in values if parent_spec.possible(v))
        for parent, values in when.items():
            where = f"space.{name}.when.{parent}"
            if parent == name:
                check.fail(where, "a parameter cannot be conditional on itself", parent)
            parent_spec = params.get(parent)
            if parent_spec is None:
                check.fail(where, f"the condition refers to {parent!r}, which is not a parameter of the space "
                           f"(parameters: {sorted(params)})", parent)
            if parent_spec.when:
                check.fail(where, f"conditions may not be nested: {parent!r} is itself conditional", parent)
            impossible = [v for v in values if not parent_spec.possible(v)]
            if impossible or not values:
                check.fail(where, f"the condition's values must be values that {parent!r} can take", list(values))
        if p.per_layer and "n_layers" not in params:
            check.fail(f"space.{name}.per_layer", "per-layer values need `n_layers` in the space "
                       "(fixed or searched)", True)
        resolved.append(ParamSpec(**{**p.__dict__, "when": when}))
    _check_batchnorm_batches(check, task, {p.name: p for p in resolved})
    return tuple(resolved)


def _check_batchnorm_batches(check: _Checker, task: TaskSpec, params: Mapping[str, ParamSpec]) -> None:
    """Refuse a space in which batchnorm may meet batches of one sample: batch statistics need two."""
    batchnorm = params.get("batchnorm")
    if batchnorm is None or not batchnorm.possible(True):
        return
    searched = params.get("batch_size")
    # A conditional batch size leaves the task's where its condition does not hold.
    smallest = task.batch_size if searched is None else searched.smallest()
    if searched is not None and searched.when:
        smallest = min(smallest, task.batch_size)
    if smallest < 2:
        where = "space.batch_size" if searched is not None and searched.smallest() < 2 else "task.batch_size"
        check.fail(where, "batchnorm (which the space allows) needs batches of at least 2 samples; raise the "
                   "smallest batch size to 2 or fix `batchnorm: false`", smallest)


def _parse_param(check: _Checker, name: str, raw: Any) -> ParamSpec:
    knob = KNOBS[name]
    where = f"space.{name}"
    if isinstance(raw, list):  # shorthand: a list is a categorical choice
        raw = {"type": "categorical", "choices": raw}
    if not isinstance(raw, Mapping):
        value = check.knob_value(knob, raw, where)
        return ParamSpec(name=name, type="fixed", value=value)
    kind = raw.get("type")
    if kind is None:
        kind = "categorical" if "choices" in raw else ("fixed" if "value" in raw else knob.kind)
        kind = {"bool": "categorical", "choice": "categorical"}.get(kind, kind)
    kind = check.choice(kind, f"{where}.type", ("int", "float", "categorical", "fixed"))
    common = ("type", "when", "per_layer")
    when = _parse_when(check, raw.get("when"), f"{where}.when")
    per_layer = check.boolean(raw.get("per_layer", False), f"{where}.per_layer")
    if per_layer and name not in PER_LAYER:
        check.fail(f"{where}.per_layer", f"only {list(PER_LAYER)} can be searched per layer", True)
    if kind == "fixed":
        m = check.mapping(raw, where, required=("value",), optional=common + ("value",))
        return ParamSpec(name=name, type="fixed", value=check.knob_value(knob, m["value"], f"{where}.value"),
                         when=when, per_layer=per_layer)
    if kind == "categorical":
        m = check.mapping(raw, where, required=("choices",), optional=common + ("choices",))
        choices = m["choices"]
        if not isinstance(choices, list) or not choices:
            check.fail(f"{where}.choices", "must be a non-empty list", choices)
        values = tuple(check.knob_value(knob, c, f"{where}.choices[{i}]") for i, c in enumerate(choices))
        if len(set(map(repr, values))) != len(values):
            check.fail(f"{where}.choices", "must not repeat a value", list(values))
        return ParamSpec(name=name, type="categorical", choices=values, when=when, per_layer=per_layer)
    # int / float ranges
    if kind != knob.kind:
        check.fail(f"{where}.type", f"{name!r} is a {knob.kind} knob; use "
                   + ("`int` or `categorical`" if knob.kind == "int" else "`categorical` or a fixed value"), kind)
    m = check.mapping(raw, where, required=("low", "high"), optional=common + ("low", "high", "log", "step"))
    convert = check.integer if kind == "int" else check.number
    low, high = convert(m["low"], f"{where}.low"), convert(m["high"], f"{where}.high")
    log = check.boolean(m.get("log", False), f"{where}.log")
    step = m.get("step")
    if step is not None:
        step = convert(step, f"{where}.step")
        if step <= 0:
            check.fail(f"{where}.step", "must be > 0", step)
    if low > high:
        check.fail(where, f"`low <= high` must hold, but got low={low!r}, high={high!r}", {"low": low, "high": high})
    if log and low <= 0:
        check.fail(f"{where}.low", "a log range must start above 0", low)
    if log and step is not None and (kind == "float" or step != 1):
        check.fail(where, "`log` and `step` cannot be combined", {"log": log, "step": step})
    for bound, value in (("low", low), ("high", high)):
        problem = knob.problem(value, bounds_only=True)
        if problem:
            check.fail(f"{where}.{bound}", f"{name} {problem}", value)
    return ParamSpec(name=name, type=kind, low=low, high=high, log=log, step=step, when=when, per_layer=per_layer)


def _parse_when(check: _Checker, raw: Any, where: str) -> dict[str, tuple[Any, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not raw:
        check.fail(where, "must map a parameter name to the value(s) under which this one is searched, "
                   "e.g. {optimizer: [sgd]}", raw)
    return {str(k): tuple(v) if isinstance(v, list) else (v,) for k, v in raw.items()}


def _parse_study(check: _Checker, raw: Any, task: TaskSpec, space: tuple[ParamSpec, ...],
                 storage: str | None, runs: Path) -> StudySpec:
    keys = ("name", "metric", "direction", "metrics", "n_trials", "timeout", "seed", "sampler", "pruner",
            "storage", "enqueue", "heartbeat_interval", "grace_period", "max_retries", "refit", "stop",
            "warm_start")
    m = check.mapping(raw, "study", required=("name",), optional=keys)
    name = check.string(m["name"], "study.name")
    if not _NAME_RE.match(name):
        check.fail("study.name", "must be 1-100 letters, digits, '_', '-' or '.', starting with a letter or digit",
                   name)
    metrics = _parse_metrics(check, m, task)
    n_trials = check.integer(m.get("n_trials", 20), "study.n_trials", low=1)
    timeout = m.get("timeout")
    if timeout is not None:
        timeout = check.number(timeout, "study.timeout")
        if timeout <= 0:
            check.fail("study.timeout", "must be a positive number of seconds", timeout)
    sampler = _parse_sampler(check, m.get("sampler", "tpe"), metrics, space)
    pruner = _parse_pruner(check, m.get("pruner", "median"), "study.pruner")
    if len(metrics) > 1 and pruner.type != "none" and "pruner" in m:
        check.fail("study.pruner", "Optuna cannot prune multi-objective studies; use `pruner: none`", pruner.type)
    if len(metrics) > 1:
        pruner = PrunerSpec(type="none")
    url = storage or m.get("storage") or f"sqlite:///{runs / 'optuna.db'}"
    url = check_storage_url(check.string(url, "study.storage"), where=f"{check.source}: study.storage")
    enqueue_raw = m.get("enqueue", [])
    if not isinstance(enqueue_raw, list):
        check.fail("study.enqueue", "must be a list of parameter mappings", enqueue_raw)
    enqueue = tuple(_parse_enqueue(check, e, f"study.enqueue[{i}]", space) for i, e in enumerate(enqueue_raw))
    heartbeat = check.integer(m.get("heartbeat_interval", 10), "study.heartbeat_interval", low=1)
    grace = check.integer(m.get("grace_period", 60), "study.grace_period", low=1)
    if grace <= heartbeat:
        check.fail("study.grace_period", f"must be longer than study.heartbeat_interval ({heartbeat})", grace)
    return StudySpec(
        name=name, metrics=metrics, n_trials=n_trials, storage=url,
        timeout=None if timeout is None else float(timeout),
        seed=check.integer(m.get("seed", 0), "study.seed", low=0),
        sampler=sampler, pruner=pruner, enqueue=enqueue, heartbeat_interval=heartbeat, grace_period=grace,
        max_retries=check.integer(m.get("max_retries", 2), "study.max_retries", low=0),
        refit=_parse_refit(check, m.get("refit"), multi_objective=len(metrics) > 1),
        stop=_parse_stop(check, m.get("stop"), metrics),
        warm_start=_parse_warm_start(check, m.get("warm_start"), url, name),
    )


def _parse_warm_start(check: _Checker, raw: Any, storage: str, name: str) -> WarmStartSpec | None:
    if raw is None:
        return None
    m = check.mapping(raw, "study.warm_start", required=("study",), optional=("study", "storage", "top_k"))
    source = check.string(m["study"], "study.warm_start.study")
    url = m.get("storage") or storage
    url = check_storage_url(check.string(url, "study.warm_start.storage"),
                            where=f"{check.source}: study.warm_start.storage")
    if source == name and url == storage:
        check.fail("study.warm_start.study", "must name another study than this one", source)
    return WarmStartSpec(study=source, storage=url,
                         top_k=check.integer(m.get("top_k", 3), "study.warm_start.top_k", low=0))


def _parse_stop(check: _Checker, raw: Any, metrics: tuple[MetricSpec, ...]) -> StopSpec:
    if raw is None:
        return StopSpec()
    m = check.mapping(raw, "study.stop", optional=("target", "patience", "min_delta", "max_minutes"))
    # A stored spec writes rules not in force as null.
    target, patience, max_minutes = m.get("target"), m.get("patience"), m.get("max_minutes")
    min_delta = check.number(m.get("min_delta", 0.0) or 0.0, "study.stop.min_delta", low=0.0)
    if len(metrics) > 1 and (target is not None or patience is not None):
        check.fail("study.stop", "`target` and `patience` need a single-objective study (a Pareto front has no "
                   "one best value); `max_minutes` works for any study", dict(m))
    if min_delta and patience is None:
        check.fail("study.stop.min_delta", "only matters with `patience`; add `patience: N`", min_delta)
    if max_minutes is not None:
        max_minutes = check.number(max_minutes, "study.stop.max_minutes")
        if max_minutes <= 0:
            check.fail("study.stop.max_minutes", "must be a positive number of minutes", max_minutes)
    return StopSpec(
        target=None if target is None else float(check.number(target, "study.stop.target")),
        patience=None if patience is None else check.integer(patience, "study.stop.patience", low=1),
        min_delta=float(min_delta),
        max_minutes=None if max_minutes is None else float(max_minutes),
    )


def _parse_refit(check: _Checker, raw: Any, *, multi_objective: bool) -> RefitSpec:
    # A Pareto front has no one best configuration to refit: off unless asked (finish then refits
    # the trial it tests, the best by the first objective).
    if raw is None or isinstance(raw, bool):
        return RefitSpec(enabled=(not multi_objective) if raw is None else raw)
    m = check.mapping(raw, "study.refit", optional=("enabled", "epochs", "data"))
    epochs = m.get("epochs", "best")
    if epochs != "best" and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        check.fail("study.refit.epochs", "must be `best` (where the best trial's validation curve peaked) or a "
                   "number of epochs >= 1", epochs)
    return RefitSpec(enabled=check.boolean(m.get("enabled", not multi_objective), "study.refit.enabled"),
                     epochs=epochs, data=check.choice(m.get("data", "train+val"), "study.refit.data", ("train+val",)))


def _parse_metrics(check: _Checker, m: Mapping[str, Any], task: TaskSpec) -> tuple[MetricSpec, ...]:
    known = {**METRICS[task.type], **STATIC_METRICS}
    if "metrics" in m and ("metric" in m or "direction" in m):
        check.fail("study.metrics", "give either `metric` (+ `direction`) or `metrics`, not both", m["metrics"])
    if "metrics" in m:
        items = m["metrics"]
        if not isinstance(items, list) or not items:
            check.fail("study.metrics", "must be a non-empty list of metric names or {name, direction}", items)
    else:
        items = [{"name": m.get("metric", DEFAULT_METRIC[task.type]), "direction": m.get("direction")}]
    out = []
    for i, item in enumerate(items):
        where = "study.metric" if "metrics" not in m else f"study.metrics[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        item = check.mapping(item, where, required=("name",), optional=("name", "direction"))
        name = check.choice(item["name"], f"{where}.name" if "metrics" in m else where, tuple(known))
        direction = item.get("direction") or known[name]
        direction = check.choice(direction, f"{where}.direction" if "metrics" in m else "study.direction",
                                 DIRECTIONS)
        out.append(MetricSpec(name=name, direction=direction))
    if len({x.name for x in out}) != len(out):
        check.fail("study.metrics", "must not name a metric twice", [x.name for x in out])
    if out[0].name in STATIC_METRICS:
        check.fail("study.metrics[0]", "the first objective must be a validation metric (it is reported "
                   "per epoch); put n_params second", out[0].name)
    return tuple(out)


def _parse_sampler(check: _Checker, raw: Any, metrics: tuple[MetricSpec, ...],
                   space: tuple[ParamSpec, ...]) -> SamplerSpec:
    if isinstance(raw, str):
        raw = {"type": raw}
    m = check.mapping(raw, "study.sampler", required=("type",), optional=None)
    kind = check.choice(m["type"], "study.sampler.type", tuple(SAMPLERS))
    options = {k: v for k, v in m.items() if k != "type"}
    # A grid sampler cannot be built without its grid (hpsearch's): its options are checked by type only.
    options = _check_options(check, "samplers", SAMPLERS[kind], options, "study.sampler", _RESERVED_SAMPLER_OPTIONS,
                             build=kind != "grid")
    if kind == "grid":
        for p in space:
            if p.type in ("int", "float") and not (p.type == "int" and not p.log and (p.step or 1) >= 1
                                                 and (p.high - p.low) <= 1000):
                check.fail(f"space.{p.name}", "a grid sampler needs a finite grid: use `categorical` choices, "
                           "a fixed value, or an int range without log", p.type)
            if p.per_layer:
                check.fail(f"space.{p.name}.per_layer", "a grid sampler cannot search per-layer values", True)
    if kind == "cmaes" and len(metrics) > 1:
        check.fail("study.sampler.type", "CMA-ES is single-objective; use nsga2, tpe or random", kind)
    return SamplerSpec(type=kind, options=options)


def _parse_pruner(check: _Checker, raw: Any, where: str) -> PrunerSpec:
    if isinstance(raw, str):
        raw = {"type": raw}
    if raw is None:
        raw = {"type": "none"}
    m = check.mapping(raw, where, required=("type",), optional=None)
    kind = check.choice(m["type"], f"{where}.type", tuple(PRUNERS))
    options = {k: v for k, v in m.items() if k not in ("type", "wrapped")}
    wrapped = None
    if kind == "patient":
        wrapped = _parse_pruner(check, m.get("wrapped", "median"), f"{where}.wrapped")
        if "patience" not in options:
            check.fail(f"{where}.patience", "the patient pruner needs `patience` (epochs without improvement)",
                       None)
    elif "wrapped" in m:
        check.fail(f"{where}.wrapped", "only the `patient` pruner wraps another pruner", m["wrapped"])
    options = _check_options(check, "pruners", PRUNERS[kind], options, where, _RESERVED_PRUNER_OPTIONS)
    return PrunerSpec(type=kind, options=options, wrapped=wrapped)


def _check_options(check: _Checker, module: str, class_name: str, options: Mapping[str, Any], where: str,
                   reserved: set[str], *, build: bool = True) -> dict[str, Any]:
    """Return the options of an Optuna sampler or pruner, each checked against the class's signature (its
    name and its annotated type), then all of them by building the object once, as Optuna checks values there."""
    import optuna  # only to read (and try) Optuna's own classes

    cls = getattr(getattr(optuna, module), class_name)
    owner = f"optuna.{module}.{class_name}"
    parameters = {name: p for name, p in inspect.signature(cls.__init__).parameters.items()
                  if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    allowed = [a for a in parameters if a not in reserved]
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key in reserved:
            check.fail(f"{where}.{key}", "is set by hpsearch (from study.seed and the space); remove it", value)
        if key not in parameters:
            check.fail(f"{where}.{key}", f"unknown option of {owner}; accepted options: {allowed}", value)
        checked[key] = _option_value(check, f"{where}.{key}", parameters[key].annotation, value, owner)
    if build:
        # The patient pruner wraps another, checked on its own: any pruner stands in for it here.
        args = (optuna.pruners.NopPruner(),) if class_name == "PatientPruner" else ()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notes on experimental features are no problem of the spec
            try:
                cls(*args, **checked)
            except Exception as exc:  # noqa: BLE001 - whatever Optuna refuses, the spec is wrong
                check.fail(where, f"{owner} cannot be built from the options {checked}: {str(exc).rstrip('.')}",
                           None)
    return checked


# The types an option's annotation may name that YAML can give: (what to say, the test of a value).
_YAML_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "None": ("null", lambda v: v is None),
    "dict": ("a mapping", lambda v: isinstance(v, Mapping)),
    "Mapping": ("a mapping", lambda v: isinstance(v, Mapping)),
    "list": ("a list", lambda v: isinstance(v, list)),
    "Sequence": ("a list", lambda v: isinstance(v, list)),
    "Any": ("anything", lambda v: True),
}


def _option_value(check: _Checker, where: str, annotation: Any, value: Any, owner: str) -> Any:
    """Return ``value`` if it has a type the option's annotation allows (YAML's 1e-3 string read as a number)."""
    if annotation is inspect.Parameter.empty:
        return value
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    kinds = [_YAML_TYPES.get(alternative.split("[", 1)[0].strip()) for alternative in _union_members(text)]
    if "float" in _union_members(text) and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if any(kind is not None and kind[1](value) for kind in kinds):
        return value
    words = list(dict.fromkeys(kind[0] for kind in kinds if kind is not None))
    if words in ([], ["null"]):  # a callable or an Optuna object, or nothing
        check.fail(where, f"takes a Python object ({text}), which a YAML spec cannot give; remove it", value)
    check.fail(where, f"must be {' or '.join(words)} ({owner} takes {text})", value)
    raise AssertionError  # unreachable


def _union_members(annotation: str) -> list[str]:
    """Return the members of a ``A | B[C | D]`` annotation, split only at its top level."""
    members, depth, start = [], 0, 0
    for i, char in enumerate(annotation):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "|" and depth == 0:
            members.append(annotation[start:i].strip())
            start = i + 1
    return [*members, annotation[start:].strip()]


def _parse_enqueue(check: _Checker, raw: Any, where: str, space: tuple[ParamSpec, ...]) -> dict[str, Any]:
    """Return one enqueued configuration; refuse a name or value the declared space cannot produce."""
    params = {p.name: p for p in space}
    searched = {name: p for name, p in params.items() if p.type != "fixed"}
    m = check.mapping(raw, where, optional=None)
    for key, value in m.items():
        base, _, index = key.rpartition("_")
        p = searched.get(key)
        if p is None and index.isdigit() and base in searched and searched[base].per_layer:
            p = searched[base]
            _check_enqueued_layer(check, f"{where}.{key}", int(index), m, params)
        if p is None:
            check.fail(f"{where}.{key}", f"is not a searched parameter (searched: {sorted(searched)})", value)
        problem = KNOBS[p.name].problem(value) or _outside_space(p, value)
        if problem:
            check.fail(f"{where}.{key}", f"{p.name} {problem}", value)
        for parent, values in p.when.items():
            if parent in m and m[parent] not in values:
                check.fail(f"{where}.{key}", f"{p.name} is searched only when {parent} is one of {list(values)}, "
                           f"but this configuration sets {parent}: {m[parent]!r}, so its value would be ignored",
                           value)
    return dict(m)


def _outside_space(p: ParamSpec, value: Any) -> str | None:
    """Return why the searched parameter ``p`` can never take ``value`` (None if it can)."""
    if p.type == "categorical":
        return None if value in p.choices else f"must be one of the searched choices {list(p.choices)}"
    if not p.low <= value <= p.high:  # type: ignore[operator]
        return f"must lie in the searched range [{p.low}, {p.high}]"
    if p.step is not None and not math.isclose((value - p.low) / p.step, round((value - p.low) / p.step),
                                               abs_tol=1e-9):
        return f"must lie on the searched grid {p.low} + k * {p.step}"
    return None


def _check_enqueued_layer(check: _Checker, where: str, index: int, m: Mapping[str, Any],
                          params: Mapping[str, ParamSpec]) -> None:
    """Refuse a per-layer value (``width_3``) for a layer the enqueued configuration cannot have."""
    n_layers = params["n_layers"]  # per-layer params need it: checked with the space
    most = m.get("n_layers", n_layers.largest())
    if isinstance(most, int) and index >= most:
        check.fail(where, f"sets layer {index}, but " + (f"this configuration sets n_layers: {most}"
                   if "n_layers" in m else f"the space allows at most {most} layers"), m[where.rsplit(".", 1)[1]])


def _parse_tracking(check: _Checker, raw: Any, study: StudySpec, tracking_uri: str | None,
                    runs: Path) -> TrackingSpec:
    keys = ("enabled", "uri", "experiment", "log_images_every", "register_model", "system_metrics")
    m = check.mapping(raw, "tracking", optional=keys)
    uri = tracking_uri or m.get("uri") or f"sqlite:///{runs / 'mlflow.db'}"
    uri = check_tracking_uri(check.string(uri, "tracking.uri"), where=f"{check.source}: tracking.uri")
    local = uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri
    return TrackingSpec(
        enabled=check.boolean(m.get("enabled", True), "tracking.enabled"),
        uri=uri,
        artifact_root=str(runs / "mlartifacts") if local else None,
        experiment=check.string(m.get("experiment") or study.name, "tracking.experiment"),
        log_images_every=check.integer(m.get("log_images_every", 1), "tracking.log_images_every", low=1),
        register_model=check.boolean(m.get("register_model", True), "tracking.register_model"),
        system_metrics=check.boolean(m.get("system_metrics", False), "tracking.system_metrics"),
    )


def check_storage_url(url: str, *, where: str = "storage") -> str:
    """Return the Optuna storage URL with relative SQLite paths made absolute; refuse others."""
    scheme = url.split(":", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme not in _STORAGE_SCHEMES:
        raise SpecError(f"{where}: {mask_password(url)!r} is not a storage URL this tool accepts. Expected "
                        "sqlite:///path/to/file.db, postgresql://user@host:5432/db (password from an "
                        "environment variable via ${VAR}) or mysql://...")
    if scheme == "sqlite":
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if not path:
            raise SpecError(f"{where}: {mask_password(url)!r} names no database file. Expected "
                            "sqlite:///path/to/file.db.")
        return "sqlite:///" + str(Path(path).resolve())
    _check_userinfo(url, where)
    return url


def _check_userinfo(url: str, where: str) -> None:
    """Refuse a password with a raw "@": drivers end it at its first "@" and take the rest for the host."""
    userinfo = url.split("://", 1)[1].rpartition("@")[0]
    if "@" in userinfo.partition(":")[2]:
        raise SpecError(f"{where}: the password in {mask_password(url)!r} contains a raw '@', which a database "
                        "driver reads as the end of the password. Percent-escape it: '@' as %40 (and ':' as "
                        "%3A, '/' as %2F).")


_TRACKING_RULE = ("an MLflow tracking URI must be sqlite:///path/mlflow.db, file:///dir, http(s)://host[:port], "
                  "postgresql://..., mysql://... or a directory path")


def check_tracking_uri(uri: str, *, where: str = "tracking.uri") -> str:
    """Return the MLflow tracking URI with relative local paths made absolute; refuse others.

    The one rule for a tracking URI, wherever it comes from (a spec, a flag, the environment, a
    stored spec, a Tracker built directly): SpecError naming ``where``, the rule and the URI (its
    secrets masked).
    """
    bad = SpecError(f"{where}: {_TRACKING_RULE}, but got {mask_password(uri) if isinstance(uri, str) else uri!r}.")
    if not isinstance(uri, str) or not uri.strip() or uri != uri.strip() or any(ord(c) < 32 for c in uri):
        raise bad  # stray blanks or control characters are a typo, not part of a directory name
    if "://" not in uri:
        if ":" in uri:  # "localhost:5000", "sqlite:x.db": a scheme or a host without the "//" of a URI
            raise bad
        return Path(uri).resolve().as_uri()  # a directory path: MLflow's file store
    scheme, rest = uri.split("://", 1)
    scheme = scheme.split("+", 1)[0].lower()  # postgresql+psycopg2 -> postgresql
    if scheme not in _TRACKING_SCHEMES or not rest.strip("/"):
        raise bad
    if scheme == "sqlite":
        if not rest.startswith("/"):  # sqlite://x is an in-memory database (nothing to share) or a typo
            raise bad
        return "sqlite:///" + str(Path(rest[1:]).resolve())
    if scheme in ("http", "https") and not re.match(r"^([^/@\s]+@)?[^/:@\s]+(:\d+)?(/\S*)?$", rest):
        raise bad
    if scheme in ("postgresql", "mysql"):
        _check_userinfo(uri, where)
    return uri


# --------------------------------------------------------------------------- checking


class _Checker:
    """Type checks that raise SpecError with the file, the key path, the rule and the value."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, rule: str, value: Any) -> None:
        shown = "" if value is None else f", but got {value!r}"
        raise SpecError(f"{self.source}: {where or 'the spec'}: {rule}{shown}.")

    def interpolate(self, raw: Any, where: str) -> Any:
        """Return ``raw`` with ${VAR} and ${VAR:-default} in strings replaced from the environment."""
        if isinstance(raw, dict):
            return {k: self.interpolate(v, f"{where}.{k}" if where else str(k)) for k, v in raw.items()}
        if isinstance(raw, list):
            return [self.interpolate(v, f"{where}[{i}]") for i, v in enumerate(raw)]
        if not isinstance(raw, str) or "${" not in raw:
            return raw

        def replace(match: re.Match[str]) -> str:
            value = os.environ.get(match.group(1))
            if value is None:
                if match.group(2) is None:
                    raise SpecError(f"{self.source}: {where}: the environment variable {match.group(1)} is not set "
                                    f"(the value refers to it as ${{{match.group(1)}}}). Set it, or write "
                                    f"${{{match.group(1)}:-default}}.")
                return match.group(2)
            return value

        return _ENV_RE.sub(replace, raw)

    def mapping(self, raw: Any, where: str, *, required: tuple[str, ...] = (),
                optional: tuple[str, ...] | None = ()) -> dict[str, Any]:
        """Return ``raw`` as a dict; refuse a non-mapping, missing keys and (unless optional=None) unknown ones."""
        if not isinstance(raw, Mapping):
            self.fail(where, "must be a mapping (key: value)", raw)
        for key in raw:
            if not isinstance(key, str):
                self.fail(f"{where}.{key}" if where else str(key), "keys must be strings", key)
        if optional is not None:
            allowed = set(required) | set(optional)
            for key in raw:
                if key not in allowed:
                    path = f"{where}.{key}" if where else key
                    self.fail(path, f"unknown key {key!r}; expected one of {sorted(allowed)}", None)
        for key in required:
            if key not in raw or raw[key] is None:
                self.fail(f"{where}.{key}" if where else key, "is required", None)
        return dict(raw)

    def string(self, raw: Any, where: str) -> str:
        if not isinstance(raw, str) or not raw.strip():
            self.fail(where, "must be a non-empty string", raw)
        return raw

    def choice(self, raw: Any, where: str, choices: tuple[str, ...]) -> str:
        if isinstance(raw, str) and raw in choices:
            return raw
        self.fail(where, f"must be one of {list(choices)}", raw)
        raise AssertionError  # unreachable

    def boolean(self, raw: Any, where: str) -> bool:
        if not isinstance(raw, bool):
            self.fail(where, "must be true or false", raw)
        return raw

    def integer(self, raw: Any, where: str, low: int | None = None) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            self.fail(where, "must be an integer", raw)
        if low is not None and raw < low:
            self.fail(where, f"must be >= {low}", raw)
        return raw

    def number(self, raw: Any, where: str, low: float | None = None, high: float | None = None) -> float:
        if isinstance(raw, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                raw = float(raw)
            except ValueError:
                self.fail(where, "must be a number", raw)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            self.fail(where, "must be a finite number", raw)
        if (low is not None and raw < low) or (high is not None and raw > high):
            self.fail(where, f"must be between {low} and {high}", raw)
        return raw

    def knob_value(self, knob: Any, raw: Any, where: str) -> Any:
        if knob.kind == "float" and isinstance(raw, str):
            raw = self.number(raw, where)
        problem = knob.problem(raw)
        if problem:
            self.fail(where, f"{knob.name} {problem}", raw)
        return raw
