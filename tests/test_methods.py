"""The rounding-method policy: one declaration per method and setting, one rule for choosing."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from quant_core import QuantError
from quant_core.cli import build_parser, main
from quant_core.format import META_SETTINGS
from quant_core.methods import AUTO, METHODS, NUM_ITER, SETTINGS, for_weight, resolve, rounding_settings


def test_auto_is_calibrated_with_statistics_else_learned() -> None:
    assert resolve(AUTO, has_statistics=True).name == "calibrated"
    assert resolve(AUTO, has_statistics=False).name == "learned"
    assert resolve("rtn", has_statistics=True).name == "rtn"


def test_a_method_needing_statistics_is_refused_without_them_and_falls_back_per_weight() -> None:
    needing = [m for m in METHODS.values() if m.needs_statistics]
    assert {m.name for m in needing} == {"calibrated", "updown"}
    for method in needing:
        with pytest.raises(QuantError, match="needs input statistics"):
            resolve(method.name, has_statistics=False)
        assert for_weight(method, has_statistics=False).name == "learned"
        assert for_weight(method, has_statistics=True) is method
    with pytest.raises(QuantError, match="unknown method 'nearest'"):
        resolve("nearest", has_statistics=False)


def test_settings_are_the_declared_defaults_overridden_by_name() -> None:
    assert rounding_settings() == {"num_iter": 256, "top_k": 1, "seed": 0}
    assert rounding_settings(top_k=4)["top_k"] == 4
    assert rounding_settings(calib_samples=10) == rounding_settings(), "a setting without effect is accepted, dropped"
    with pytest.raises(QuantError, match="unknown rounding setting 'topk'"):
        rounding_settings(topk=4)


def test_the_command_line_offers_every_flag_setting_with_its_default_and_minimum(example_model) -> None:
    args = build_parser().parse_args(["--input", "m.safetensors"])
    flags = [s for s in SETTINGS if s.is_flag]
    assert [s.name for s in flags] == ["num_iter", "top_k", "calib_samples"]
    assert all(getattr(args, s.name) == s.default for s in flags)
    assert not hasattr(args, "seed")
    for setting in flags:
        if setting.has_effect:
            with pytest.raises(SystemExit):
                main(["--input", str(example_model), f"--{setting.name}", str(setting.minimum - 1)])
    assert NUM_ITER.minimum == 0


def test_calib_samples_is_accepted_for_compatibility_and_says_it_has_no_effect(example_model, capsys) -> None:
    help_text = " ".join(build_parser().format_help().split())
    assert (
        "--calib_samples CALIB_SAMPLES Accepted for compatibility with the original script; has no effect." in help_text
    )
    out = example_model.with_name("o.safetensors")
    assert (
        main(["--input", str(example_model), "--output", str(out), "--method", "rtn", "--calib_samples", "5", "-q"])
        == 0
    )
    with safe_open(str(out), "pt") as f:
        settings = json.loads(f.metadata()[META_SETTINGS])
    assert "calib_samples" not in settings and settings["method"] == "rtn"
