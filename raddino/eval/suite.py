"""Evaluation suites: YAML files naming datasets, backbones, protocols and settings (see ``eval/*.yaml``).

Unknown keys are errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raddino.errors import RaddinoError
from raddino.eval.adapters.base import FEATURE_PROTOCOLS, RESIZE_MODES
from raddino.eval.adapters.registry import parse_spec
from raddino.eval.datasets.base import SpecBase
from raddino.eval.datasets.registry import KINDS, spec_class, spec_keys
from raddino.eval.finetune import TrainSchedule
from raddino.eval.published import METRICS, PublishedRow, published_from_dict

# Evaluation protocols. "linear" is logistic regression (ridge for regression targets).
PROTOCOLS = ("linear", "knn_cosine", "knn_euclidean", "finetune_frozen", "finetune_unfrozen")


@dataclass(frozen=True)
class BackboneEntry:
    """One backbone of a suite: a spec (``timm:NAME`` ...) plus how to get its weights.

    Attributes:
        spec: the backbone spec string.
        weights: a local weights file instead of the library's download.
        random_init: seeded random weights (a baseline; never downloads).
        img_size: input size override (default: the backbone's own).
        name: label in tables and plots (default: the spec, with " (random)" for random init).
    """

    spec: str
    weights: str | None = None
    random_init: bool = False
    img_size: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        parse_spec(self.spec)
        if self.img_size is not None and self.img_size <= 0:
            raise RaddinoError(f"backbone {self.spec}: img_size must be positive, got {self.img_size}")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.random_init:
            return f"{self.spec} (random)"
        return f"{self.spec} [{Path(self.weights).name}]" if self.weights else self.spec


@dataclass(frozen=True)
class Suite:
    """A parsed suite (field meanings in ``docs/EVAL.md``)."""

    name: str
    datasets: tuple[SpecBase, ...]  # one spec class per kind (raddino.eval.datasets.registry)
    backbones: tuple[BackboneEntry, ...]
    protocols: tuple[str, ...] = ("linear", "knn_cosine")
    features: tuple[str, ...] = ("cls",)
    label_fractions: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)
    resize: str = "resize"
    data_root: str | None = None
    n_bootstrap: int = 1000
    batch_size: int = 64
    limit: int | None = None
    knn_k: dict[str, int] = field(default_factory=dict)
    knn_temperature: float = 0.07
    Cs: tuple[float, ...] | None = None  # noqa: N815  (scikit-learn's spelling)
    max_iter: int = 1000
    finetune: TrainSchedule = field(default_factory=TrainSchedule)
    finetune_features: str = "cls"
    report_metrics: tuple[str, ...] = ()  # extra tables in results.md besides the primary metric (e.g. mae)
    published: tuple[PublishedRow, ...] = ()  # the paper's numbers, printed beside the measured rows

    def __post_init__(self) -> None:
        for protocol in self.protocols:
            if protocol not in PROTOCOLS:
                raise RaddinoError(f"suite {self.name}: unknown protocol {protocol!r}; expected {', '.join(PROTOCOLS)}")
        for feature in (*self.features, self.finetune_features):
            if feature not in FEATURE_PROTOCOLS:
                raise RaddinoError(
                    f"suite {self.name}: unknown feature protocol {feature!r}; expected {', '.join(FEATURE_PROTOCOLS)}"
                )
        if self.resize not in RESIZE_MODES:
            raise RaddinoError(f"suite {self.name}: resize must be {' or '.join(RESIZE_MODES)}, got {self.resize!r}")
        for fraction in self.label_fractions:
            if not 0.0 < fraction <= 1.0:
                raise RaddinoError(f"suite {self.name}: label fractions must be in (0, 1], got {fraction}")
        if not self.seeds:
            raise RaddinoError(f"suite {self.name}: seeds must not be empty")
        if self.n_bootstrap < 0 or self.batch_size < 1 or (self.limit is not None and self.limit < 10):
            raise RaddinoError(f"suite {self.name}: need n_bootstrap >= 0, batch_size >= 1 and limit >= 10")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise RaddinoError(f"suite {self.name}: dataset names must be unique, got {names}")
        for metric in self.report_metrics:
            if metric not in METRICS:
                raise RaddinoError(
                    f"suite {self.name}: unknown report metric {metric!r}; expected {', '.join(METRICS)}"
                )
        for row in self.published:
            if row.protocol not in PROTOCOLS:
                raise RaddinoError(
                    f"suite {self.name}: published row {row.model} / {row.dataset}: unknown protocol {row.protocol!r}"
                )
        unknown_k = set(self.knn_k) - {"cosine", "euclidean"}
        if unknown_k:
            raise RaddinoError(f"suite {self.name}: knn_k keys must be cosine / euclidean, got {sorted(unknown_k)}")

    def data_root_path(self, base: Path | None = None) -> Path | None:
        """``data_root`` as a path (relative ones are relative to ``base``, e.g. the current directory)."""
        if self.data_root is None:
            return base
        root = Path(self.data_root).expanduser()
        return root if root.is_absolute() or base is None else base / root


def _strict(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RaddinoError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(known))})")
    return values


def _tuple(value: Any) -> tuple:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def dataset_spec_from_dict(entry: dict[str, Any], where: str) -> SpecBase:
    """The spec of one ``datasets:`` entry, of the class its ``kind`` names; a key of another kind (or of none) is an
    error naming the dataset, the kind and the key."""
    if not isinstance(entry, dict) or "name" not in entry or "kind" not in entry:
        raise RaddinoError(f"{where}: each dataset needs at least 'name' and 'kind'")
    name, kind = entry["name"], entry["kind"]
    cls = spec_class(kind, dataset=name)
    allowed = spec_keys(kind)
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        # a key of another kind is the likely mistake (e.g. split_column on a folder dataset): say whose it is
        owners = {key: [k for k in KINDS if key in spec_keys(k)] for key in unknown}
        hint = "".join(f"{key} belongs to {' / '.join(kinds)}; " for key, kinds in owners.items() if kinds)
        raise RaddinoError(
            f"{where} dataset {name}: unknown key(s) {', '.join(unknown)} for kind {kind} "
            f"({hint}allowed: {', '.join(allowed)})"
        )
    values = {k: v for k, v in entry.items() if k != "kind"}
    for key in ("label_columns", "classes", "split_fractions", "header"):
        if key in values and values[key] is not None:
            values[key] = _tuple(values[key])
    if values.get("split_values"):
        values["split_values"] = {k: _tuple(v) for k, v in values["split_values"].items()}
    for key in ("where", "where_not"):
        if values.get(key):
            values[key] = {k: tuple(str(x) for x in _tuple(v)) for k, v in values[key].items()}
    if values.get("value_map"):
        values["value_map"] = {str(k): float(v) for k, v in values["value_map"].items()}
    return cls(**values)


def backbone_from_value(value: Any, where: str) -> BackboneEntry:
    if isinstance(value, str):
        return BackboneEntry(spec=value)
    if isinstance(value, dict) and "spec" in value:
        return BackboneEntry(**_strict(BackboneEntry, value, f"{where} backbone {value['spec']}"))
    raise RaddinoError(f"{where}: a backbone is a spec string or a mapping with 'spec', got {value!r}")


def suite_from_dict(payload: dict[str, Any], *, name: str) -> Suite:
    """Build a :class:`Suite` from parsed YAML (strict keys)."""
    if not isinstance(payload, dict):
        raise RaddinoError(f"suite {name}: expected a mapping at the top level")
    values = dict(_strict(Suite, payload, f"suite {name}"))
    values.setdefault("name", name)
    values["datasets"] = tuple(dataset_spec_from_dict(d, f"suite {name}") for d in values.get("datasets") or [])
    values["backbones"] = tuple(backbone_from_value(b, f"suite {name}") for b in values.get("backbones") or [])
    values["published"] = tuple(published_from_dict(p, f"suite {name}") for p in values.get("published") or [])
    for key in ("protocols", "features", "label_fractions", "seeds", "Cs", "report_metrics"):
        if key in values and values[key] is not None:
            values[key] = _tuple(values[key])
    if "label_fractions" in values:
        values["label_fractions"] = tuple(float(f) for f in values["label_fractions"])
    if "finetune" in values:
        schedule = values["finetune"] or {}
        values["finetune"] = TrainSchedule(**_strict(TrainSchedule, schedule, f"suite {name} finetune"))
    suite = Suite(**values)
    _check_published_names(suite)
    return suite


def _check_published_names(suite: Suite) -> None:
    """Published rows must name a dataset and a backbone label of the suite, or they would never align (checked when
    the file is read: ``--backbone`` may replace the backbones later, and the rows are then listed unmatched)."""
    datasets = [d.name for d in suite.datasets]
    labels = [b.label for b in suite.backbones]
    for row in suite.published:
        if row.dataset not in datasets:
            raise RaddinoError(
                f"suite {suite.name}: published row {row.model}: dataset {row.dataset!r} is not in the suite "
                f"({', '.join(datasets)})"
            )
        if row.backbone not in labels:
            raise RaddinoError(
                f"suite {suite.name}: published row {row.model}: backbone {row.backbone!r} is no backbone label of the "
                f"suite ({', '.join(labels)}; set a backbone's 'name' to match)"
            )


def load_suite(path: str | Path) -> Suite:
    """Parse a suite YAML file; errors name the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise RaddinoError(f"suite file not found: {path}")
    try:
        payload = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RaddinoError(f"cannot parse suite {path}: {err}") from None
    return suite_from_dict(payload or {}, name=path.stem)
