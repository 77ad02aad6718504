"""Which recorded layer's statistics belong to which weight of a file, by name."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from ..errors import QuantError
from ..format import WEIGHT_SUFFIX
from .statistics import CalibrationStatistics

log = logging.getLogger(__name__)


def match_weight_keys(layer_names: Iterable[str], weight_keys: Iterable[str]) -> dict[str, str]:
    """Map weight keys of a file ('<name>.weight') onto recorded layer names, by dotted suffix.

    The recorder may have run on a wrapper (layer '0.auto_model.encoder...', file 'encoder...') or
    the file may carry a prefix the module tree lacks ('model.diffusion_model.'): a key matches a
    layer when one name, split at dots, ends with the other. Among several matches the longest
    wins; ties, and layers claimed by more than one key, stay unmatched (logged, never guessed).
    """
    by_last: dict[str, list[tuple[str, list[str]]]] = defaultdict(list)
    for layer in layer_names:
        parts = layer.split(".")
        by_last[parts[-1]].append((layer, parts))
    chosen: dict[str, str] = {}
    for key in weight_keys:
        if not key.endswith(WEIGHT_SUFFIX):
            continue
        parts = key[: -len(WEIGHT_SUFFIX)].split(".")
        fits = [(min(len(parts), len(lp)), layer) for layer, lp in by_last[parts[-1]] if _suffix_match(parts, lp)]
        if not fits:
            continue
        fits.sort(reverse=True)
        if len(fits) > 1 and fits[0][0] == fits[1][0]:
            log.warning(
                "weight '%s' fits recorded layers '%s' and '%s' equally; no statistics used",
                key,
                fits[0][1],
                fits[1][1],
            )
            continue
        chosen[key] = fits[0][1]
    claims: dict[str, list[str]] = defaultdict(list)
    for key, layer in chosen.items():
        claims[layer].append(key)
    for layer, keys in claims.items():
        if len(keys) > 1:
            log.warning(
                "recorded layer '%s' fits %d weights (e.g. '%s'); no statistics used for them",
                layer,
                len(keys),
                keys[0],
            )
            for key in keys:
                del chosen[key]
    return chosen


def statistics_for_weights(
    stats: CalibrationStatistics, weights: Mapping[str, Sequence[int]], model: str
) -> dict[str, str]:
    """Weight key -> recorded layer for the 2-D weights of `model` (name -> shape), checked.

    A statistics file that matches no weight, or whose input width differs from a matched
    weight's, was recorded on another model: that is an error, not a silent data-free fallback.
    Weights without a match (embeddings, convolutions) are simply absent from the result.
    """
    matched = match_weight_keys(stats.layers, weights)
    if not matched:
        example = next(iter(stats.layers), "")
        raise QuantError(
            f"{stats.source}: none of its {len(stats.layers)} recorded layers (e.g. '{example}') matches a weight "
            f"of {model}; record statistics on this model"
        )
    for key, layer in matched.items():
        width = weights[key][1]
        if stats.dim_of(layer) != width:
            raise QuantError(
                f"{stats.source}: layer '{layer}' was recorded with {stats.dim_of(layer)} input features but "
                f"'{key}' in {model} has {width}; record statistics on this model"
            )
    return matched


def _suffix_match(a: list[str], b: list[str]) -> bool:
    n = min(len(a), len(b))
    return a[len(a) - n :] == b[len(b) - n :]
