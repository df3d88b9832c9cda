import os

import pytest
import torch

from miniresnet.checkpoint import load_checkpoint, load_model, model_from_checkpoint, save_checkpoint, strip_prefixes
from miniresnet.errors import MiniResNetError
from miniresnet.model import MiniResNet


def state_of(model: MiniResNet) -> dict:
    return {
        "arch": model.arch(),
        "weights": model.state_dict(),
        "classes": ["a"] * 10,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "epoch": 1,
    }


def test_round_trip(tmp_path):
    model = MiniResNet()
    save_checkpoint(state_of(model), tmp_path / "c.pt")
    restored = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), restored.eval()(x))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_a_checkpoint_written_before_the_key_rename_still_loads(tmp_path):
    """Checkpoints once named the weights to use "model" and the raw trained ones "trained_model",
    and held no image size (CIFAR's 32 then)."""
    model = MiniResNet()
    old = {**state_of(model), "trained_model": None}
    old["model"] = old.pop("weights")
    torch.save({"format": "miniresnet-checkpoint", **old}, tmp_path / "old.pt")
    state = load_checkpoint(tmp_path / "old.pt")
    assert "model" not in state and state["trained_weights"] is None
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), model_from_checkpoint(state).eval()(x))
    loaded = load_model(tmp_path / "old.pt")
    assert loaded.image_size == 32 and loaded.classes == ("a",) * 10


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(state_of(MiniResNet()), tmp_path / "c.pt")
    before = (tmp_path / "c.pt").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(MiniResNetError, match="No space left on device; the previous c.pt is unchanged"):
        save_checkpoint(state_of(MiniResNet()), tmp_path / "c.pt")
    assert (tmp_path / "c.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint", b"PK\x03\x04broken zip"])
def test_unreadable_files_are_clear_errors(tmp_path, content):
    (tmp_path / "c.pt").write_bytes(content)
    with pytest.raises(MiniResNetError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "c.pt")


def test_truncated_checkpoint(tmp_path):
    save_checkpoint(state_of(MiniResNet()), tmp_path / "c.pt")
    raw = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MiniResNetError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "c.pt")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(MiniResNetError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_other_pytorch_file_is_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(MiniResNetError, match="not a miniresnet checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_malicious_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "miniresnet-checkpoint", "model": Payload()}, tmp_path / "evil.pt", pickle_protocol=2)
    refused_global = f"{os.system.__module__}.{os.system.__name__}"  # posix.system on Linux
    with pytest.raises(MiniResNetError, match=f"refused for safety: .*the refused global: {refused_global}"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned-by-checkpoint").exists()
    # The payload is live: an unrestricted load really runs it (harmlessly, inside tmp_path).
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "pwned-by-checkpoint").exists()


def test_other_architecture_is_a_clear_error(tmp_path):
    state = state_of(MiniResNet((8, 16, 32)))
    state["arch"] = MiniResNet().arch()  # claims the default widths, holds smaller weights
    save_checkpoint(state, tmp_path / "c.pt")
    with pytest.raises(MiniResNetError, match="do not fit"):
        model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))


def test_ddp_and_compile_prefixes_are_stripped():
    weights = MiniResNet().state_dict()
    wrapped = {f"module._orig_mod.{k}": v for k, v in weights.items()}
    assert list(strip_prefixes(wrapped)) == list(weights)
