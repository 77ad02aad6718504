"""Rounding-method policy: the methods, what each needs, and its settings. The one place to add or change one.

A `Method` declares its rounding function (`quant_core.rounding.RoundingMethod`), whether it needs
recorded input statistics, and the settings it reads; a `Setting` declares its default, bounds and
help text once, and where it is offered (`Offer`). The command line's flags and LearnedRoundingFP16's
widgets are generated from these declarations, the converter records every setting that has an effect
in the output's metadata, and `resolve` is the one rule that turns a request (or `auto`) into a method.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .calibrated import updown_rounding
from .errors import QuantError
from .held_out import checked_calibrated_rounding
from .learned import learned_rounding
from .rounding import RoundingMethod, round_nearest


class Offer(enum.Enum):
    """Where a setting is offered, and whether it has an effect."""

    EVERYWHERE = "flag and node widget"
    FIXED = "neither: a fixed value, recorded for reproducible outputs"
    COMPATIBILITY = "a flag only, so the original script's command lines keep working; no effect, not recorded"


@dataclass(frozen=True)
class Setting:
    """An integer setting of the rounding: flag `--<name>`, node input `<name>`, key `<name>` in the metadata."""

    name: str
    default: int
    minimum: int
    maximum: int  # the node widget's bound; the command line accepts any value from the minimum up
    help: str
    offer: Offer = Offer.EVERYWHERE

    @property
    def is_flag(self) -> bool:
        return self.offer is not Offer.FIXED

    @property
    def is_widget(self) -> bool:
        return self.offer is Offer.EVERYWHERE

    @property
    def has_effect(self) -> bool:
        """Read by the rounding (so recorded in the output's metadata)."""
        return self.offer is not Offer.COMPATIBILITY


NUM_ITER = Setting("num_iter", 256, 0, 100_000, "Maximum search iterations per tensor; usually converges in 1-3.")
TOP_K = Setting("top_k", 1, 1, 64, "Principal directions whose error the search cancels.")
CALIB_SAMPLES = Setting(
    "calib_samples",
    3072,
    0,
    1 << 20,
    "Accepted for compatibility with the original script; has no effect. Calibration statistics come from "
    "--calib (the token cap is set when they are recorded: StatisticsRecorder(max_tokens=...)).",
    Offer.COMPATIBILITY,
)
SEED = Setting("seed", 0, 0, 2**31 - 1, "Seed of the search's random sketch.", Offer.FIXED)
SETTINGS: tuple[Setting, ...] = (NUM_ITER, TOP_K, CALIB_SAMPLES, SEED)  # in the order of the flags and widgets


@dataclass(frozen=True)
class Method:
    name: str
    round: RoundingMethod
    needs_statistics: bool  # without statistics for a weight, that weight falls back to DEFAULT
    settings: tuple[Setting, ...]  # the settings `round` reads
    help: str


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "learned",
            learned_rounding,
            False,
            (NUM_ITER, TOP_K, SEED),
            "data-free, cancels the rounding error along the weight's principal directions",
        ),
        Method("rtn", round_nearest, False, (), "round-to-nearest, fastest"),
        Method(
            "calibrated",
            checked_calibrated_rounding,
            True,
            (),
            "error feedback on recorded input statistics, the smallest output error, kept per layer only where it "
            "beats round-to-nearest on a part of the statistics its rounding did not see",
        ),
        Method(
            "updown", updown_rounding, True, (), "each value one of its two float16 neighbours, on recorded statistics"
        ),
    )
}
AUTO = "auto"
DEFAULT = "learned"  # without statistics, and for weights that have none
WITH_STATISTICS = "calibrated"  # what `auto` means when statistics are given


def resolve(requested: str, has_statistics: bool) -> Method:
    """The method for a request: a method's name, or `auto` (calibrated with statistics, else learned)."""
    if requested == AUTO:
        return METHODS[WITH_STATISTICS if has_statistics else DEFAULT]
    method = METHODS.get(requested)
    if method is None:
        raise QuantError(f"unknown method '{requested}'; choose one of {', '.join([AUTO, *METHODS])}")
    if method.needs_statistics and not has_statistics:
        raise QuantError(
            f"method '{requested}' needs input statistics: pass --calib FILE (see quant_core.calibration), "
            "or connect a calibration in ComfyUI"
        )
    return method


def for_weight(method: Method, has_statistics: bool) -> Method:
    """The method one weight is rounded with: a method needing statistics falls back to DEFAULT where it has none."""
    return METHODS[DEFAULT] if method.needs_statistics and not has_statistics else method


def rounding_settings(**values: int) -> dict[str, int]:
    """Every setting's value: the given ones over the declared defaults (an unknown name is an error).

    Settings without effect are accepted and left out: they are neither read nor recorded.
    """
    known = {setting.name: setting.default for setting in SETTINGS if setting.has_effect}
    ignored = {setting.name for setting in SETTINGS if not setting.has_effect}
    unknown = sorted(set(values) - set(known) - ignored)
    if unknown:
        raise QuantError(f"unknown rounding setting '{unknown[0]}'; known: {', '.join(known)}")
    return {**known, **{name: value for name, value in values.items() if name in known}}


def methods_reading(setting: Setting) -> list[str]:
    """The methods that read `setting` (for help texts)."""
    return [method.name for method in METHODS.values() if setting in method.settings]
