import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

from app.checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint
from app.model import CLASSES, INPUT_SHAPE, MEAN, STD, FinalModel, LiteModel


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    torch.manual_seed(1)
    model = FinalModel()
    path = tmp_path / "w.pt"
    save_checkpoint(
        path,
        model,
        metrics={"test_acc": 0.87, "per_class_accuracy": {"cat": 0.7}},
        config={"epochs": 3, "dropout": 0.05},
        epoch=3,
        data_fingerprint="abc",
        code_version="v1",
        created_at="2026-01-01T00:00:00+00:00",
    )
    raw = torch.load(path, weights_only=True)  # loads with the safe loader alone
    assert raw["model"] == "FinalModel" and raw["classes"] == list(CLASSES)
    ckpt = load_checkpoint(path)
    assert ckpt.meta["metrics"]["test_acc"] == 0.87
    assert ckpt.meta["epoch"] == 3 and ckpt.meta["data_fingerprint"] == "abc"
    assert ckpt.meta["torch_version"] == torch.__version__
    assert len(ckpt.sha256) == 64
    assert _same_weights(build_model(ckpt), model)


def test_bare_state_dict_loads_with_empty_metadata(tmp_path):
    model = FinalModel()
    path = tmp_path / "bare.pt"
    torch.save(model.state_dict(), path)
    ckpt = load_checkpoint(path)
    assert ckpt.is_bare
    assert _same_weights(build_model(ckpt), model)


def test_a_lite_checkpoint_round_trips_as_a_lite_model(tmp_path):
    torch.manual_seed(0)
    lite = LiteModel().eval()
    save_checkpoint(tmp_path / "lite.pt", lite, epoch=1)
    ckpt = load_checkpoint(tmp_path / "lite.pt")
    assert ckpt.meta["model"] == "LiteModel"
    rebuilt = build_model(ckpt)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert isinstance(rebuilt, LiteModel) and torch.equal(rebuilt(x), lite(x))


def test_build_model_can_insist_on_one_architecture(tmp_path):
    save_checkpoint(tmp_path / "lite.pt", LiteModel(), epoch=1)
    with pytest.raises(CheckpointError, match="holds a LiteModel, not FinalModel"):
        build_model(load_checkpoint(tmp_path / "lite.pt"), "FinalModel")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_file_is_refused_with_one_sentence(tmp_path, damage):
    path = tmp_path / "w.pt"
    save_checkpoint(path, FinalModel())
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "damaged" in message and str(path) in message
    assert "\n" not in message and "Traceback" not in message


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": FinalModel().state_dict(), "obj": OrderedDict, "fn": print}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(path)


def test_wrong_architecture_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit FinalModel"):
        build_model(load_checkpoint(path))


def test_wrong_shape_and_nan_are_refused(tmp_path):
    sd = FinalModel().state_dict()
    sd["fc.weight"] = torch.zeros(5, 256)
    torch.save(sd, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match="wrong shape"):
        build_model(load_checkpoint(tmp_path / "shape.pt"))
    sd = FinalModel().state_dict()
    sd["fc.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="NaN"):
        build_model(load_checkpoint(tmp_path / "nan.pt"))


def test_other_classes_are_refused(tmp_path):
    path = tmp_path / "w.pt"
    save_checkpoint(path, FinalModel())
    payload = torch.load(path, weights_only=True)
    payload["classes"] = [f"c{i}" for i in range(10)]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="other classes"):
        load_checkpoint(path)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    save_checkpoint(path, FinalModel(), epoch=1)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, FinalModel(), epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]


def test_killed_writer_never_leaves_half_a_file(tmp_path):
    """SIGKILL a process that rewrites the checkpoint in a loop: the file always loads."""
    path = tmp_path / "w.pt"
    save_checkpoint(path, FinalModel(), epoch=0)
    code = (
        "import sys; from app.checkpoint import save_checkpoint; from app.model import FinalModel\n"
        "m = FinalModel(); i = 0\n"
        "while True:\n"
        "    i += 1; save_checkpoint(sys.argv[1], m, epoch=i)\n"
    )
    for delay in (0.6, 0.9, 1.3):
        proc = subprocess.Popen([sys.executable, "-c", code, str(path)])
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert isinstance(load_checkpoint(path).meta["epoch"], int)


def test_written_file_is_readable_by_others(tmp_path):
    path = tmp_path / "w.pt"
    save_checkpoint(path, FinalModel())
    assert path.stat().st_mode & 0o044 == 0o044


@pytest.mark.parametrize(
    ("key", "value", "phrase"),
    [
        ("mean", [0.5, 0.5, 0.5], "another normalisation (mean [0.5, 0.5, 0.5]"),
        ("std", [0.2470, 0.2435, 0.9], "another normalisation"),
        ("input_shape", [3, 64, 64], "inputs of shape [3, 64, 64], not the [3, 32, 32]"),
        ("mean", None, "another normalisation (mean None"),  # a file that does not say
    ],
)
def test_other_normalisation_or_input_shape_is_refused(tmp_path, key, value, phrase):
    """Weights trained on other pixels would be served wrong, and silently: refuse them."""
    path = tmp_path / "w.pt"
    save_checkpoint(path, FinalModel())
    payload = torch.load(path, weights_only=True)
    if value is None:
        del payload[key]
    else:
        payload[key] = value
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert phrase in message and str(path) in message and "\n" not in message


def test_the_code_s_own_normalisation_loads(tmp_path):
    """The stored lists equal the constants (up to float rounding); a tuple in place of a list too."""
    path = tmp_path / "w.pt"
    save_checkpoint(path, FinalModel())
    payload = torch.load(path, weights_only=True)
    payload["mean"] = [m + 1e-9 for m in MEAN]
    payload["input_shape"] = tuple(INPUT_SHAPE)
    torch.save(payload, path)
    assert load_checkpoint(path).meta["std"] == list(STD)
