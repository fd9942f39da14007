import math
import types

import pytest
import torch

from mmcore import (
    atomic_write,
    fused_optimizer,
    is_compiling,
    modes_kept,
    read_json,
    save_directory,
    sinusoidal_positions,
    stacklevel_outside,
    trainable_dtype,
)


def test_sinusoidal_positions_values_and_dtype():
    table = sinusoidal_positions(6, 4)
    assert table.shape == (6, 4) and table.dtype == torch.float32
    # position p, pair i: sin and cos of p / 10000^(2i / dim)
    p, i = 5, 1
    angle = p / 10000 ** (2 * i / 4)
    torch.testing.assert_close(table[p, 2 * i], torch.tensor(math.sin(angle)))
    torch.testing.assert_close(table[p, 2 * i + 1], torch.tensor(math.cos(angle)))
    # odd widths: the last column is a sine
    assert sinusoidal_positions(3, 5)[:, -1].abs().sum() > 0
    # the dtype of the sequence it is added to, so half precision is not promoted to float32
    half = sinusoidal_positions(6, 4, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, table.to(torch.bfloat16))
    assert (torch.zeros(6, 4, dtype=torch.bfloat16) + half).dtype == torch.bfloat16


def test_fused_optimizer_uses_one_kernel_where_it_can():
    cpu = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    opt = fused_optimizer(torch.optim.AdamW, iter(cpu), lr=1e-2)  # an iterator is read once
    assert len(opt.param_groups[0]["params"]) == 2 and opt.defaults["lr"] == 1e-2
    if torch.__version__ >= "2.4":  # fused CPU kernels
        assert opt.defaults["fused"] and not opt.defaults["foreach"]
    else:
        assert opt.defaults["foreach"] and not opt.defaults["fused"]
    # no fused kernel on this device: the foreach one, and the optimiser still steps
    meta = [torch.nn.Parameter(torch.randn(3, device="meta"))]
    assert fused_optimizer(torch.optim.Adam, meta).defaults["foreach"]
    before = cpu[0].detach().clone()
    cpu[0].grad = torch.ones(3)
    opt.step()
    assert not torch.equal(before, cpu[0])


def test_is_compiling_inside_and_outside_torch_compile():
    def probe(x):
        return x + 1 if is_compiling() else x - 1

    x = torch.zeros(2)
    assert probe(x).tolist() == [-1.0, -1.0]
    assert torch.compile(probe, backend="eager")(x).tolist() == [1.0, 1.0]


def test_read_json_returns_the_object_and_names_a_bad_file(tmp_path):
    path = tmp_path / "config.json"
    with atomic_write(path) as f:
        f.write('{"rank": 4}')
    assert read_json(path, "Loader") == {"rank": 4}
    with pytest.raises(FileNotFoundError, match=r"Loader: .*missing\.json not found"):
        read_json(tmp_path / "missing.json", "Loader")
    for text, match in [
        ('{"rank": ', r"config\.json is not valid JSON \(Expecting value"),
        ("[4]", "holds a JSON list, expected an object"),
        ("\udcff", "not valid JSON"),
    ]:
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(ValueError, match=match):
            read_json(path, "Loader")


def test_save_directory_creates_folders_and_refuses_a_file_in_the_way(tmp_path):
    nested = save_directory(tmp_path / "a" / "b", "Saver")
    assert nested.is_dir() and save_directory(nested, "Saver") == nested  # again: no error
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "file" / "inside"):
        with pytest.raises(NotADirectoryError, match=r"Saver: cannot save into .*file is a file"):
            save_directory(path, "Saver")


def test_stacklevel_outside_names_the_first_frame_outside_the_packages(tmp_path):
    """Frames of the given packages (and of torch) are skipped; a sibling folder whose name
    merely starts with a package's is not."""
    package = types.ModuleType("pkg")
    package.__file__ = str(tmp_path / "pkg" / "__init__.py")

    def call_from(filename):
        code = compile("level = stacklevel_outside(package)", filename, "exec")
        scope = {"stacklevel_outside": stacklevel_outside, "package": package}
        exec(code, scope)
        return scope["level"]

    assert call_from(str(tmp_path / "pkg" / "inner.py")) == 2  # past pkg's frame: its caller
    assert call_from(str(tmp_path / "pkg_extra" / "inner.py")) == 1  # not pkg's


def test_modes_kept_restores_each_modules_own_mode():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).train()
    model[1].eval()  # a BatchNorm frozen on purpose
    with pytest.raises(RuntimeError, match="inside"), modes_kept(model) as kept:
        assert kept is model
        model.eval()
        raise RuntimeError("inside")
    assert model.training and model[0].training and not model[1].training


def test_trainable_dtype_is_float32_below_32_bits():
    """Small trained parts of a float16, bfloat16 or float8 model are float32 (a float8
    adapter had no matrix product); other dtypes are kept."""
    low = [torch.float16, torch.bfloat16]
    low += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
    for dtype in low:
        assert trainable_dtype(dtype) == torch.float32
    for dtype in (torch.float32, torch.float64, torch.int8):
        assert trainable_dtype(dtype) == dtype
