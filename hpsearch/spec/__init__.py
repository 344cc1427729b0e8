"""A study spec (YAML) → typed, frozen objects; every check of user input lives here.

The spec is read once, validated completely, and refused with one message naming the file,
the key path, the rule and the value before any trial runs. By concept:

- :mod:`.file`: a spec file → plain data (safe YAML of a sane size);
- :mod:`.objects`: the frozen objects and their round trip to plain data;
- :mod:`.parse` (with :mod:`.parse_space` and :mod:`.parse_study`): plain data → validated objects;
- :mod:`.check`: the checks values go through (types, choices, ${ENV}, Optuna classes' options);
- :mod:`.urls`: storage and tracking URLs, and the secrets they carry.

The closed lists a spec's values are checked against live in :mod:`hpsearch.vocab`; the
hyperparameters and their bounds in :mod:`hpsearch.knobs`.
"""

from hpsearch.spec.file import read_yaml
from hpsearch.spec.objects import (MaskSpec, MetricSpec, ModelSpec, NoiseSpec, ParamSpec, PrunerSpec, RefitSpec,
                                   SamplerSpec, Spec, StopSpec, StudySpec, TaskSpec, TrackingSpec, WarmStartSpec)
from hpsearch.spec.parse import load_spec, parse_spec, spec_from_dict
from hpsearch.spec.urls import (check_storage_url, check_tracking_uri, hide_secrets, mask_password, url_secrets,
                                without_credentials)

__all__ = [
    "MaskSpec", "MetricSpec", "ModelSpec", "NoiseSpec", "ParamSpec", "PrunerSpec", "RefitSpec", "SamplerSpec", "Spec",
    "StopSpec", "StudySpec", "TaskSpec", "TrackingSpec", "WarmStartSpec",
    "check_storage_url", "check_tracking_uri", "hide_secrets", "load_spec", "mask_password", "parse_spec",
    "read_yaml", "spec_from_dict", "url_secrets", "without_credentials",
]
