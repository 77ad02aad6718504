"""The layout: per source tensor, its fate and the output tensors its producer writes; the file is their list."""

from __future__ import annotations

import torch
from safetensors import safe_open

from quant_core import ConvertOptions, convert_file
from quant_core.format import META_SCALED_WEIGHTS
from quant_core.plan import Fate, Selection, choose, plan_layout
from quant_core.safetensors_io import SafetensorsFile


def layout_of(path, selection: Selection, calibrated=()):
    with SafetensorsFile(path) as src:
        return plan_layout(src, choose(src.entries.values(), selection), selection.t5xxl, calibrated)


def test_every_source_tensor_declares_its_outputs(save) -> None:
    src = save(
        {
            "enc.q.weight": torch.randn(4, 3),
            "enc.q.bias": torch.tensor([0.1, 0.2, 0.3, 0.4]),
            "enc.norm.weight": torch.tensor([1.0, 0.5, 2.0]),
            "img_in.weight": torch.randn(3, 3, dtype=torch.bfloat16),
            "decoder.x.weight": torch.randn(2, 2),
            "ids": torch.arange(3),
        }
    )
    layout = layout_of(src, Selection(t5xxl=True, keep_distillation=True))
    plans = {plan.name: plan for plan in layout.plans}
    outputs = {name: [(t.name, t.dtype) for t in plan.outputs] for name, plan in plans.items()}
    assert plans["enc.q.weight"].fate is Fate.QUANTIZED
    assert outputs["enc.q.weight"] == [
        ("enc.q.weight", "F16"),
        ("enc.q.scale_weight", "F32"),
        ("enc.q.scale_input", "F32"),
    ]
    assert plans["enc.q.bias"].fate is Fate.KEPT and outputs["enc.q.bias"] == [("enc.q.bias", "F32")]  # inexact
    assert plans["enc.norm.weight"].fate is Fate.CAST and outputs["enc.norm.weight"] == [("enc.norm.weight", "F16")]
    assert outputs["img_in.weight"] == [("img_in.weight", "BF16"), ("img_in.scale_weight", "F32")]
    assert plans["decoder.x.weight"].fate is Fate.DROPPED and outputs["decoder.x.weight"] == []
    assert outputs["ids"] == [("ids", "I64")]
    assert [t.name for t in layout.tensors] == [n for o in outputs.values() for n, _ in o] + ["scaled_fp16"]
    assert layout.scaled_weights == ["enc.q.weight", "img_in.weight"]


def test_a_corrected_bias_is_written_by_its_weight(save) -> None:
    src = save({"l.bias": torch.tensor([0.5, 1.0]), "l.weight": torch.randn(2, 3), "m.bias": torch.tensor([0.5, 1.0])})
    plans = {plan.name: plan for plan in layout_of(src, Selection(), calibrated=["l.weight"]).plans}
    assert plans["l.bias"].fate is Fate.KEPT and plans["l.bias"].outputs == ()
    assert [t.name for t in plans["l.weight"].outputs] == ["l.weight", "l.bias", "l.scale_weight"]
    assert plans["m.bias"].fate is Fate.CAST  # no weight with statistics: cast, exactly


def test_the_file_records_which_weights_carry_a_scale(save, tmp_path) -> None:
    src = save({"img_in.weight": torch.randn(4, 4), "a.weight": torch.randn(4, 4), "b.weight": torch.randn(4, 4)})
    out = tmp_path / "out.safetensors"
    convert_file(src, out, ConvertOptions(method="rtn", keep_distillation=True, exclude=("^b",)))
    with safe_open(str(out), "pt") as f:
        recorded = f.metadata()[META_SCALED_WEIGHTS]
        scales = sorted(k for k in f.keys() if k.endswith(".scale_weight"))  # noqa: SIM118  (not a dict)
    assert recorded == '["a.weight", "img_in.weight"]'
    assert scales == ["a.scale_weight", "img_in.scale_weight"]
