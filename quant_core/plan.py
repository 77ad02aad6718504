"""The output file's layout: per source tensor, its output tensors and the producer that writes them.

Decided before any work, in two steps. The rules (`choose`) pick an action per tensor from names,
dtypes and shapes alone, following the original script: every 2-D `.weight` is quantized; `--t5xxl`
drops the decoder and keeps norms, biases and embeddings; `--keep_distillation` keeps Flux's
distillation layers in their original precision with `scale_weight` 1; `--exclude` keeps user-chosen
tensors. The layout (`plan_layout`) then gives each tensor its fate and producer
(`quant_core.produce`), looking at values only to tell whether a float16 cast would be exact (and,
in the plain format, whether plain float16 holds a weight faithfully), and at which weights have
statistics (their biases are corrected). The converter writes what it says.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import QuantError
from .format import PLAIN, SCALED, WEIGHT_SUFFIX, layer_name, scale_weight_key
from .fp16 import FP16_MAX, exact_fp16_cast, round_to_fp16, work_dtype_for
from .produce import CastToFloat16, Copy, CopyWithUnitScale, Marker, PlainFloat16, Producer, ScaledFloat16
from .rounding import CHUNK_ELEMENTS, ErrorStats
from .safetensors_io import OutputTensor, SafetensorsFile, TensorEntry

T5XXL_DROP_NAMES = ("decoder", "lm_head")
T5XXL_KEEP_NAMES = ("norm", "bias", "embed_tokens", "shared")
DISTILLATION_NAMES = ("distilled_guidance_layer", "final_layer", "img_in", "txt_in")
QUANTIZABLE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class Action(enum.Enum):
    """What the rules ask for one tensor."""

    QUANTIZE = "quantize"  # scaled float16 + scale_weight
    KEEP = "keep"  # bytes copied unchanged
    CAST_IF_EXACT = "cast_if_exact"  # float16 when lossless and finite, else kept
    DROP = "drop"


@dataclass(frozen=True)
class Choice:
    """The rules' action for one tensor, decided from its name, dtype and shape."""

    entry: TensorEntry
    action: Action
    reason: str
    unit_scale: bool = False  # kept weight that still gets scale_weight = 1 (distillation layers)
    excluded: bool = False  # the user asked to keep it as it is (--exclude)

    @property
    def name(self) -> str:
        return self.entry.name


class Fate(str, enum.Enum):
    """What became of a source tensor (the report lists tensors by it)."""

    QUANTIZED = "quantized"
    CAST = "cast"  # to float16, exactly
    KEPT = "kept"
    NOT_PLAIN = "kept_in_source_precision"  # a weight plain float16 cannot hold (the scaled format would)
    DROPPED = "dropped"


@dataclass(frozen=True)
class TensorPlan:
    """One source tensor: its fate, why, and the output tensors its producer writes (none when dropped)."""

    entry: TensorEntry
    fate: Fate
    reason: str
    producer: Producer | None = None  # None: nothing to write here (dropped, or written by its weight's producer)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def outputs(self) -> tuple[OutputTensor, ...]:
        return self.producer.outputs(self.entry) if self.producer is not None else ()


@dataclass(frozen=True)
class Layout:
    """The whole output file: the source tensors' plans, in file order, then the file's own tensors (the marker)."""

    plans: list[TensorPlan]
    file_producers: tuple[Producer, ...]

    @property
    def tensors(self) -> list[OutputTensor]:
        return [t for plan in self.plans for t in plan.outputs] + [
            t for producer in self.file_producers for t in producer.outputs(None)
        ]

    @property
    def scaled_weights(self) -> list[str]:
        """The weights written with a `scale_weight` (recorded in the file, so readers can check each has it)."""
        return [plan.name for plan in self.plans if scale_weight_key(plan.name) in {t.name for t in plan.outputs}]


@dataclass(frozen=True)
class Selection:
    t5xxl: bool = False
    keep_distillation: bool = False
    exclude: Sequence[str] = ()


def compile_patterns(patterns: Iterable[str]) -> list[re.Pattern[str]]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise QuantError(f"--exclude pattern {p!r} is not a valid regular expression: {exc}") from None
    return compiled


def is_quantizable_weight(entry: TensorEntry) -> bool:
    return (
        entry.name.endswith(WEIGHT_SUFFIX)
        and len(entry.shape) == 2
        and entry.numel > 0
        and entry.torch_dtype in QUANTIZABLE_DTYPES
    )


# The rules' reasons for not quantizing a weight the user asked about, and what to do when no weight is left.
T5XXL_DROPPED = "T5XXL decoder/lm_head tensor (--t5xxl)"
DISTILLATION_KEPT = "distillation layer (--keep_distillation)"
EXCLUDED = "excluded by --exclude"
T5XXL_KEPT = "T5XXL norm/bias/embedding kept (--t5xxl)"
_REMEDIES = {
    EXCLUDED: "excluded by --exclude: check the patterns",
    DISTILLATION_KEPT: "kept by --keep_distillation: convert without it",
    T5XXL_DROPPED: "dropped by --t5xxl (decoder): convert without it",
    T5XXL_KEPT: "kept by --t5xxl (norms, embeddings): convert without it",
}
_NOT_PLAIN_REMEDY = (
    "that plain float16 cannot hold (values beyond 65504 or in its subnormal range): use --format scaled"
)


def choose_for(entry: TensorEntry, selection: Selection, patterns: Sequence[re.Pattern[str]]) -> Choice:
    name = entry.name
    if selection.t5xxl and any(s in name for s in T5XXL_DROP_NAMES):
        return Choice(entry, Action.DROP, T5XXL_DROPPED)
    dtype = entry.torch_dtype
    if dtype is None or not dtype.is_floating_point:
        return Choice(entry, Action.KEEP, f"{entry.dtype} tensor copied unchanged")
    if dtype not in QUANTIZABLE_DTYPES:
        return Choice(entry, Action.KEEP, f"{entry.dtype} is not a supported source precision; copied unchanged")
    if selection.keep_distillation and any(s in name for s in DISTILLATION_NAMES):
        return Choice(entry, Action.KEEP, DISTILLATION_KEPT, unit_scale=is_quantizable_weight(entry))
    if any(p.search(name) for p in patterns):
        return Choice(entry, Action.CAST_IF_EXACT, EXCLUDED, excluded=True)
    if selection.t5xxl and any(s in name for s in T5XXL_KEEP_NAMES):
        return Choice(entry, Action.CAST_IF_EXACT, T5XXL_KEPT)
    if is_quantizable_weight(entry):
        return Choice(entry, Action.QUANTIZE, "2-D weight")
    return Choice(entry, Action.CAST_IF_EXACT, "not a 2-D weight")


def choose(entries: Iterable[TensorEntry], selection: Selection) -> list[Choice]:
    patterns = compile_patterns(selection.exclude)
    return [choose_for(e, selection, patterns) for e in entries]


def unsupported_precision(choices: Iterable[Choice]) -> list[str]:
    """Floating-point tensors in a precision the converter does not read (float8): copied unchanged."""
    return [
        c.name
        for c in choices
        if c.entry.torch_dtype is not None
        and c.entry.torch_dtype.is_floating_point
        and c.entry.torch_dtype not in QUANTIZABLE_DTYPES
    ]


def nothing_to_quantize(source: str, choices: Sequence[Choice], not_plain: Collection[str] = ()) -> QuantError:
    """The error for a conversion that would quantize no weight (its output would be the input in another
    container): why, counted by cause over the file's 2-D weights, and what to do about each cause."""
    causes: dict[str, int] = {}
    for choice in choices:
        entry = choice.entry
        if not (entry.name.endswith(WEIGHT_SUFFIX) and len(entry.shape) == 2 and entry.numel > 0):
            continue
        if choice.name in not_plain:
            cause = _NOT_PLAIN_REMEDY
        elif choice.reason in _REMEDIES:
            cause = _REMEDIES[choice.reason]
        else:  # the only other way a 2-D weight is not quantized: its precision
            precision = "float8" if entry.dtype.startswith("F8") else entry.dtype
            cause = f"in {precision}: convert the original bf16/fp16/fp32 file"
        causes[cause] = causes.get(cause, 0) + 1
    if causes:
        largest_first = sorted(causes.items(), key=lambda item: -item[1])
        why = "; ".join(f"{count} weight{'s' if count > 1 else ''} {cause}" for cause, count in largest_first)
    elif not choices:
        why = "the file holds no tensors"
    else:
        why = (
            f"none of its {len(choices)} tensors is a 2-D '.weight' (a Linear layer's weight), the kind this "
            "converter quantizes"
        )
    return QuantError(f"{source}: no weight would be quantized, so nothing was written ({why})")


class ValueScan:
    """Progress of the checks that read values before anything is written, in bytes of the tensors they read.

    Made with every tensor the checks may read (`values_read`, and the weights whose scales are found
    up front); `reading` is called before each read, `skip` for one that turned out not to need it.
    `report(name, done_bytes, total_bytes)` hears of each read before it starts.
    """

    def __init__(
        self,
        entries: Iterable[TensorEntry],
        report: Callable[[str, int, int], None] | None = None,
        check_cancelled: Callable[[], None] | None = None,
    ):
        self._pending = {entry.name: entry.nbytes for entry in entries if entry.nbytes}  # an empty one takes no time
        self.total = sum(self._pending.values())
        self.done = 0
        self._report = report
        self._check_cancelled = check_cancelled

    def reading(self, name: str) -> None:
        if self._check_cancelled is not None:
            self._check_cancelled()
        if self._report is not None and name in self._pending:
            self._report(name, self.done, self.total)
        self.done += self._pending.pop(name, 0)

    def skip(self, name: str) -> None:
        self.done += self._pending.pop(name, 0)


def values_read(choices: Iterable[Choice], output_format: str = SCALED) -> list[TensorEntry]:
    """The tensors `plan_layout` may read: those a float16 cast may hold exactly, and in the plain format every
    weight to quantize (whether plain float16 holds it)."""
    return [
        c.entry
        for c in choices
        if (c.action is Action.CAST_IF_EXACT and c.entry.dtype != "F16")
        or (output_format == PLAIN and c.action is Action.QUANTIZE)
    ]


BIAS_CORRECTED = "bias corrected with the calibration mean, source precision kept"
# Plain float16 keeps a weight faithfully when round-to-nearest's relative error (Frobenius) is at most
# twice float16's unit roundoff 2^-11: in its normal range no tensor can exceed 2^-11, so anything
# beyond 2^-10 is lost to the subnormal range (values below 2^-14), where the scaled format keeps
# every value at float16's full relative precision.
PLAIN_ERROR_LIMIT = 2.0**-10


def plan_layout(
    src: SafetensorsFile,
    choices: list[Choice],
    t5xxl: bool,
    calibrated: Collection[str] = (),
    output_format: str = SCALED,
    scan: ValueScan | None = None,
) -> Layout:
    """Each tensor's fate and producer; `calibrated`: quantized weights with input statistics (biases corrected).

    In the plain format a weight plain float16 cannot hold faithfully keeps its source precision
    (found here, by reading its values: the file's header depends on it). `scan` hears of every read.
    """
    plain = output_format == PLAIN
    scan = scan if scan is not None else ValueScan(())
    not_plain = {
        choice.name: problem
        for choice in choices
        if plain and choice.action is Action.QUANTIZE and (problem := plain_float16_problem(src, choice.name, scan))
    }
    biases = _biases_to_correct(src, choices, [w for w in calibrated if w not in not_plain])
    corrected = {weight: bias for bias, weight in biases.items()}
    plans = []
    for choice in choices:
        entry = choice.entry
        if choice.name in biases:  # written by its weight's producer
            scan.skip(choice.name)
            plans.append(TensorPlan(entry, Fate.KEPT, BIAS_CORRECTED))
        elif choice.name in not_plain:
            reason = f"{not_plain[choice.name]}; source precision kept (--format scaled keeps it in float16)"
            plans.append(TensorPlan(entry, Fate.NOT_PLAIN, reason, Copy()))
        elif choice.action is Action.QUANTIZE:
            bias = src.entries[corrected[choice.name]] if choice.name in corrected else None
            producer = PlainFloat16(bias) if plain else ScaledFloat16(t5xxl, bias)
            plans.append(TensorPlan(entry, Fate.QUANTIZED, choice.reason, producer))
        elif choice.action is Action.DROP:
            plans.append(TensorPlan(entry, Fate.DROPPED, choice.reason))
        elif choice.action is Action.CAST_IF_EXACT and entry.dtype != "F16" and _casts_exactly(src, choice.name, scan):
            plans.append(TensorPlan(entry, Fate.CAST, choice.reason, CastToFloat16()))
        else:
            producer = CopyWithUnitScale() if choice.unit_scale and not plain else Copy()
            plans.append(TensorPlan(entry, Fate.KEPT, _kept_reason(choice), producer))
    layout = Layout(plans, () if plain else (Marker(t5xxl),))
    names = [t.name for t in layout.tensors]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash is not None:
        raise QuantError(f"{src.path}: the output would hold two tensors named '{clash}'; rename or --exclude it")
    return layout


def plain_float16_problem(src: SafetensorsFile, name: str, scan: ValueScan | None = None) -> str | None:
    """Why plain float16 cannot hold this weight faithfully (values beyond 65504, or lost to its subnormal
    range), or None; QuantError for NaN or infinity, which no float16 format holds."""
    if scan is not None:
        scan.reading(name)
    flat = src.tensor(name).reshape(-1)
    work = work_dtype_for(flat.dtype)
    error = ErrorStats()
    for i in range(0, flat.numel(), CHUNK_ELEMENTS):
        x = flat[i : i + CHUNK_ELEMENTS].to(work)
        low, high = torch.aminmax(x)
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):
            raise QuantError(
                f"{src.path}: tensor '{name}' holds NaN or infinity and cannot be converted to float16; "
                f"fix the source or keep it unquantized with --exclude '^{re.escape(name)}$'"
            )
        largest = max(-float(low), float(high))
        if largest > FP16_MAX:
            return f"values up to {largest:.6g} exceed float16's largest, 65504"
        error.add(x, round_to_fp16(x))
    if error.relative_error > PLAIN_ERROR_LIMIT:
        return (
            f"relative error {error.relative_error:.2e} in plain float16 (values in its subnormal range) exceeds 2^-10"
        )
    return None


def _casts_exactly(src: SafetensorsFile, name: str, scan: ValueScan) -> bool:
    scan.reading(name)
    flat = src.tensor(name).reshape(-1)
    return all(exact_fp16_cast(flat[i : i + CHUNK_ELEMENTS]) for i in range(0, flat.numel(), CHUNK_ELEMENTS))


def _kept_reason(choice: Choice) -> str:
    if choice.action is not Action.CAST_IF_EXACT:
        return choice.reason
    if choice.entry.dtype == "F16":
        return f"{choice.reason}; already float16"
    return f"{choice.reason}; float16 would not be exact, source precision kept"


def _biases_to_correct(src: SafetensorsFile, choices: list[Choice], calibrated: Collection[str]) -> dict[str, str]:
    """Float biases (kept or cast, not dropped or excluded) of the weights in `calibrated`, with matching length."""
    chosen = {choice.name: choice for choice in choices}
    biases = {}
    for weight in calibrated:
        choice = chosen.get(layer_name(weight) + ".bias")
        if (
            choice is not None
            and choice.action is not Action.DROP
            and not choice.excluded
            and choice.entry.torch_dtype is not None
            and choice.entry.torch_dtype.is_floating_point
            and choice.entry.shape == (src.entries[weight].shape[0],)
        ):
            biases[choice.name] = weight
    return biases


def select_prefix(entries: Mapping[str, TensorEntry], prefix: str, source: str) -> dict[str, TensorEntry]:
    """The tensors whose names start with `prefix`, renamed without it (one component of a checkpoint).

    Entries keep their file offsets, so a reader looking tensors up by the new names reads the right
    bytes. An empty prefix selects everything unchanged.
    """
    if not prefix:
        return dict(entries)
    selected = {
        name[len(prefix) :]: dataclasses.replace(entry, name=name[len(prefix) :])
        for name, entry in entries.items()
        if name.startswith(prefix) and len(name) > len(prefix)
    }
    if not selected:
        raise QuantError(f"{source}: no tensor name starts with '{prefix}'; this file does not hold that component")
    return selected
