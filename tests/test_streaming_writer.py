import pytest
import torch
from safetensors.torch import load_file, save_file

from quant_core import QuantError
from quant_core.safetensors_io import OutputTensor, SafetensorsFile, StreamingWriter, tensor_nbytes

TENSORS = {
    "b.f16": torch.arange(7, dtype=torch.float16),
    "a.f32": torch.linspace(-1, 1, 12).reshape(3, 4),
    "c.bf16": torch.ones(5, dtype=torch.bfloat16),
    "d.i64": torch.arange(3),
    "e.bool": torch.tensor([True, False, True]),
    "f.scalar": torch.tensor(2.5),
    "g.empty": torch.zeros(0, 3),
}
NAMES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64", torch.bool: "BOOL"}


def declared():
    return [
        OutputTensor(k, NAMES[v.dtype], tuple(v.shape), tensor_nbytes(NAMES[v.dtype], v.shape))
        for k, v in TENSORS.items()
    ]


def test_streamed_file_reads_like_save_file(tmp_path):
    target = tmp_path / "streamed.safetensors"
    with StreamingWriter(target, declared(), {"k": "v"}) as w:
        for name in reversed(list(TENSORS)):  # write order does not matter
            w.write(name, TENSORS[name])
        w.commit()
    reference = tmp_path / "reference.safetensors"
    save_file(TENSORS, str(reference), metadata={"k": "v"})
    got, want = load_file(str(target)), load_file(str(reference))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
    assert target.read_bytes() == reference.read_bytes()  # same layout as the library's own writer
    with SafetensorsFile(target) as f:
        assert f.metadata == {"k": "v"}
        assert torch.equal(f.tensor("a.f32"), TENSORS["a.f32"])


def test_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with StreamingWriter(target, declared(), {}) as w:
            w.write("a.f32", TENSORS["a.f32"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_commit_refuses_missing_tensors_and_wrong_sizes(tmp_path):
    with StreamingWriter(tmp_path / "out.safetensors", declared(), {}) as w:
        with pytest.raises(ValueError, match="bytes given"):
            w.write("a.f32", torch.zeros(2))
        with pytest.raises(RuntimeError, match="never written"):
            w.commit()
    assert list(tmp_path.iterdir()) == []


def test_never_replaces_an_existing_file_unless_asked(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"precious")
    one = [OutputTensor("x", "F32", (1,), 4)]
    with StreamingWriter(target, one, {}) as w:
        w.write("x", torch.ones(1))
        with pytest.raises(QuantError, match="already exists"):
            w.commit()
    assert target.read_bytes() == b"precious"
    assert list(tmp_path.iterdir()) == [target]
    with StreamingWriter(target, one, {}, overwrite=True) as w:
        w.write("x", torch.ones(1))
        w.commit()
    assert torch.equal(load_file(str(target))["x"], torch.ones(1))
