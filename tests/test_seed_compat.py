"""Files written by the original script load through our reader."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quant_core import QuantError
from quant_core.reader import dequantize_state_dict
from tests.fixtures.make_seed_layout_fixture import seed_layout_tensors

FIXTURE = Path(__file__).with_name("fixtures") / "seed_layout.safetensors"


def test_fixture_matches_its_generator():
    tensors, _ = seed_layout_tensors()
    on_disk = load_file(str(FIXTURE))
    assert on_disk.keys() == tensors.keys()
    marker = on_disk.pop("scaled_fp16")  # torch.empty in the original: its values are arbitrary
    assert marker.dtype == torch.float16 and marker.shape == (2,)
    assert all(torch.equal(on_disk[k], tensors[k]) for k in on_disk)


def test_seed_layout_dequantizes_to_the_real_weights():
    _, real = seed_layout_tensors()
    restored = dequantize_state_dict(load_file(str(FIXTURE)))
    assert set(restored) == set(real)
    for key, value in real.items():
        torch.testing.assert_close(restored[key], value, rtol=2**-10, atol=0)


@pytest.mark.parametrize(
    "bad", [torch.tensor([0.0]), torch.tensor([float("nan")]), torch.tensor([-1.0]), torch.ones(2)]
)
def test_malformed_scale_is_refused(bad):
    tensors = load_file(str(FIXTURE))
    tensors["layers.0.linear.scale_weight"] = bad
    with pytest.raises(QuantError, match="layers.0.linear.scale_weight"):
        dequantize_state_dict(tensors)
