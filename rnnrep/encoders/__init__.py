"""The six weight encoders, by name.

Every encoder maps a batch of flat member parameters `[B, P]` to unit-norm
embeddings `[B, 16]`. Four are mechanistic (they read the weights): `statistics`,
`flat`, `transformer`, `dws`; two are functionalist (they run the member on probe
inputs): `noninteractive`, `interactive`. Modules are imported on first use, so
asking for one encoder never imports the others.

    cfg = encoder_config("dws", "formal-languages", channels=(32, 32))
    encoder = build_encoder("dws", spec, "formal-languages", channels=(32, 32))
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from torch import nn

from rnnrep.config import ConfigError
from rnnrep.encoders.common import count_parameters
from rnnrep.lstm import LSTMSpec

KINDS = ("formal-languages", "sequential-mnist")

# name -> (module in this package, encoder class, config class)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "statistics": ("statistics", "StatisticsEncoder", "StatisticsConfig"),
    "flat": ("flat", "FlatEncoder", "FlatConfig"),
    "transformer": ("transformer", "TransformerEncoder", "TransformerConfig"),
    "dws": ("dws", "DWSEncoder", "DWSConfig"),
    "noninteractive": ("probing", "NonInteractiveProbing", "ProbingConfig"),
    "interactive": ("probing", "InteractiveProbing", "ProbingConfig"),
}
ENCODERS: tuple[str, ...] = tuple(_REGISTRY)
MECHANISTIC: tuple[str, ...] = ("statistics", "flat", "transformer", "dws")
PROBING: tuple[str, ...] = ("noninteractive", "interactive")

# How each encoder treats the member's hidden-neuron permutation symmetry.
SYMMETRY: dict[str, str] = {
    "statistics": "invariant by construction (per-tensor statistics)",
    "flat": "trained with random permutation augmentation",
    "transformer": "trained with random permutation augmentation",
    "dws": "invariant by construction (equivariant layers, pooled)",
    "noninteractive": "invariant: sees only the member's function",
    "interactive": "invariant: sees only the member's function",
}

# The probe length is the one architecture choice that depends on the task: a probe
# spans a formal-language sequence (22 steps) or an MNIST image's 50 tiles.
_KIND_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    name: {"formal-languages": {"probe_length": 22}, "sequential-mnist": {"probe_length": 50}} for name in PROBING
}


def _check(name: str, kind: str) -> None:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODERS)}")
    if kind not in KINDS:
        raise ConfigError(f"unknown zoo kind {kind!r}; choose one of: {', '.join(KINDS)}")


def _load(name: str, attr_index: int) -> Any:
    module = importlib.import_module(f"{__name__}.{_REGISTRY[name][0]}")
    return getattr(module, _REGISTRY[name][attr_index])


def encoder_config(name: str, kind: str, **overrides: Any) -> Any:
    """The typed config of encoder `name` for zoo `kind`: paper defaults + overrides.

    Lists are turned into tuples (YAML and Tune spaces give lists), so configs stay
    hashable; an override that is not a field is a ValueError naming the fields.
    """
    _check(name, kind)
    config_cls = _load(name, 2)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"{name} has no setting(s) {unknown}; its settings are: {', '.join(sorted(fields))}")
    values = {**_KIND_DEFAULTS.get(name, {}).get(kind, {}), **overrides}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return config_cls(**values)
    except ConfigError:
        raise
    except ValueError as e:  # a config's own check of a value: bad input, not a bug
        raise ConfigError(f"{name}: {e}") from None


def build_encoder(name: str, spec: LSTMSpec, kind: str, **overrides: Any) -> nn.Module:
    """Encoder `name` for members of `spec` from zoo `kind`, paper defaults + overrides."""
    cfg = encoder_config(name, kind, **overrides)
    encoder_cls = _load(name, 1)
    if name in PROBING:  # probes are token distributions (FL) or free tiles (MNIST)
        return encoder_cls(spec, kind, cfg)
    return encoder_cls(spec, cfg)


__all__ = ["ENCODERS", "KINDS", "MECHANISTIC", "PROBING", "SYMMETRY", "build_encoder", "count_parameters", "encoder_config"]
