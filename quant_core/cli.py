"""Command line: the original script's flags, defaults and output naming, plus a few of our own."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .calibration import load_statistics
from .convert import ConvertOptions, convert_file, resolve_device
from .errors import QuantError
from .format import OUTPUT_FORMATS, SCALED
from .methods import AUTO, DEFAULT, METHODS, SETTINGS, WITH_STATISTICS, methods_reading, resolve
from .report import LayerReport, report_path_for
from .staging import discard_unplaced


class _ChosenMethod(argparse.Action):
    """Stores --method and remembers it was given: otherwise the method is `auto` (it depends on --calib)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.method_given = True


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it says something: not for None, an off switch or an empty list."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def program_name(argv0: str) -> str:
    """The name the user ran the command line by: the script or command, or `python -m <package>`."""
    path = Path(argv0)
    return f"python -m {path.parent.name}" if path.name == "__main__.py" else path.name


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or program_name(sys.argv[0]),
        description="Convert safetensors weights to float16, scaled (power-of-two scales) or plain, "
        "with learned rounding.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--input", required=True, help="Input safetensors file path.")
    parser.add_argument(
        "--output",
        help="Output safetensors file, or a folder (existing, or ending with /) to write the default name into. "
        "Default: <input>_float16_scaled_learned[_nodistill]_svd.safetensors beside the input (plain format: "
        "without _scaled).",
    )
    parser.add_argument(
        "--format",
        choices=list(OUTPUT_FORMATS),
        default=SCALED,
        help="scaled: float16 + a power-of-two scale_weight per weight (needs this pack's loader); plain: ordinary "
        "float16 any loader reads (a weight plain float16 cannot hold keeps its source precision).",
    )
    parser.add_argument(
        "--keep_distillation", action="store_true", help="Keep Flux distillation layers in original precision."
    )
    parser.add_argument(
        "--t5xxl", action="store_true", help="T5XXL mode: drop the decoder, keep norms/biases/embeddings."
    )
    parser.add_argument(
        "--calib",
        metavar="FILE",
        help="Input statistics (quant_core.calibration): calibrated rounding by default, and bias correction.",
    )
    for setting in SETTINGS:
        if setting.is_flag:
            used_by = methods_reading(setting)
            help_text = f"{setting.help} ({', '.join(used_by)})" if used_by else setting.help
            parser.add_argument(f"--{setting.name}", type=int, default=setting.default, help=help_text)
    parser.add_argument(
        "--method",
        choices=sorted(METHODS),
        default=DEFAULT,
        action=_ChosenMethod,
        help="Rounding method: "
        + "; ".join(f"{m.name} ({m.help})" for m in METHODS.values())
        + f". With --calib the default is {WITH_STATISTICS}.",
    )
    parser.set_defaults(method_given=False)
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available), cpu, cuda or cuda:N: the converter runs on CUDA or the CPU; the converted "
        "file loads on any device.",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="REGEX",
        help="Keep tensors whose name matches REGEX unquantized (repeatable).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output file.")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="Log every tensor.")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="No progress bar or summary, errors only.")
    parser.add_argument("--version", action="version", version=f"learned-rounding-fp16 {__version__}")
    return parser


class TqdmListener:
    """Progress on stderr: a bar over the bytes the value checks read, then one over the tensors."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.checks: tqdm | None = None
        self.bar: tqdm | None = None

    def checking_values(self, name: str, done_bytes: int, total_bytes: int) -> None:
        if self.enabled and self.checks is None:
            self.checks = tqdm(
                desc="checking values",
                total=total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                dynamic_ncols=True,
            )
        if self.checks is not None:
            self.checks.set_postfix_str(name[-48:], refresh=False)
            self.checks.update(done_bytes - self.checks.n)

    def tensor_started(self, name: str, index: int, total: int) -> None:
        if self.checks is not None:  # every check passed
            self.checks.update(self.checks.total - self.checks.n)
            self._close_checks()
        if self.enabled and self.bar is None:
            self.bar = tqdm(desc="converting", total=total, unit="tensor", dynamic_ncols=True)
        if self.bar is not None:
            self.bar.set_postfix_str(name[-48:], refresh=False)

    def tensor_finished(self, name: str, index: int, total: int, layer: LayerReport | None) -> None:
        if layer is not None:
            logging.getLogger("quant_core").debug(
                "%s: scale 2^%d, rel. error %.3e, %.1f%% exact, %d iterations",
                name,
                round(math.log2(layer.scale)),
                layer.relative_error,
                100 * layer.exact_fraction,
                layer.iterations,
            )
        if self.bar is not None:
            self.bar.update(1)

    def _close_checks(self) -> None:
        if self.checks is not None:
            self.checks.close()
            self.checks = None

    def close(self) -> None:
        self._close_checks()
        if self.bar is not None:
            self.bar.close()


class _ThroughTqdm(logging.Handler):
    """Log records on stderr through tqdm.write, which clears a progress bar first and redraws it after."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001  (logging's own rule: a broken handler must not stop the program)
            self.handleError(record)


@contextlib.contextmanager
def _console_logging(level: int) -> Iterator[None]:
    """Log at `level` on stderr for the duration of a run (and no longer: `main` can be called in-process)."""
    root = logging.getLogger()
    handler = _ThroughTqdm()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    previous = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for setting in SETTINGS:
        if setting.is_flag and setting.has_effect and getattr(args, setting.name) < setting.minimum:
            parser.error(f"--{setting.name} must be >= {setting.minimum}")
    if not args.method_given:
        args.method = AUTO
    try:
        args.method = resolve(args.method, has_statistics=args.calib is not None).name
    except QuantError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    level = logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.WARNING
    with _console_logging(level):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up the partial output like Ctrl-C does
    options = ConvertOptions(
        method=args.method,
        rounding={s.name: getattr(args, s.name) for s in SETTINGS if s.is_flag and s.has_effect},
        t5xxl=args.t5xxl,
        keep_distillation=args.keep_distillation,
        exclude=tuple(args.exclude),
        device=args.device,
        overwrite=args.overwrite,
        format=args.format,
    )
    listener = TqdmListener(enabled=not args.quiet)
    try:
        resolve_device(args.device)  # before the statistics are read
        statistics = load_statistics(args.calib) if args.calib else None
        report = convert_file(args.input, args.output, options, statistics=statistics, listener=listener)
    except QuantError as exc:
        listener.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        discard_unplaced()  # the interrupt may have landed before a file's owner took charge of it
        listener.close()
        print("interrupted: no output was written", file=sys.stderr)
        return 130
    listener.close()
    if not args.quiet:
        print("\n".join(report.summary_lines()))
        print(f"per-layer report: {report_path_for(report.output)}")
    return 0
