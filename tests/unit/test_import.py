"""`tandem import`: weights from outside Tandem become a verified artifact, or a clear refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.artifacts import ArtifactError, load_model, verify_artifact
from cluster.config import load_config
from training.importing import WeightsMismatchError, import_weights
from training.models import mlp


def config(tmp_path, hidden="[32]"):
    return load_config(None, [f"cluster.storage={tmp_path}", f"model.args.hidden={hidden}"])


def test_imported_weights_become_an_artifact_that_loads_the_same_module(tmp_path):
    torch.manual_seed(0)
    module = mlp((64,), 10, hidden=[32]).eval()
    torch.save(module.state_dict(), tmp_path / "w.pt")
    result = import_weights(config(tmp_path), tmp_path / "w.pt")
    manifest = verify_artifact(result.artifact_dir)
    assert manifest["version"] == result.version and manifest["imported"]["sha256"]
    assert set(manifest["metrics"]) == {"val_loss", "val_accuracy"}
    loaded, _ = load_model(result.artifact_dir)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), module(x))


def wider(state):
    return mlp((64,), 10, hidden=[64]).state_dict()


def with_extra_key(state):
    return {**state, "head.weight": torch.zeros(3)}


def without_a_key(state):
    return {k: v for k, v in state.items() if k != "1.bias"}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (wider, "key '1.weight' has shape (64, 64) in the weights but (32, 64) in the module"),
        (with_extra_key, "key 'head.weight' (shape (3,)) is in the weights but not in the module"),
        (without_a_key, "key '1.bias' (shape (32,)) is missing from the weights"),
    ],
)
def test_weights_that_do_not_fit_are_refused_naming_the_first_key(tmp_path, change, named):
    torch.save(change(mlp((64,), 10, hidden=[32]).state_dict()), tmp_path / "w.pt")
    with pytest.raises(WeightsMismatchError, match="set model.builder and model.args") as info:
        import_weights(config(tmp_path), tmp_path / "w.pt")
    assert named in str(info.value)
    assert not list(tmp_path.rglob("manifest.json")), "a refused import wrote an artifact"


class Trap:
    """Unpickling it creates `marker`: the side effect a malicious checkpoint would have."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_module_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": mlp((64,), 10, hidden=[32]), "trap": Trap(marker)}, tmp_path / "module.pt")
    with pytest.raises(ArtifactError, match=r"weights_only=True.*save it with torch.save\(model.state_dict\(\), path\)"):
        import_weights(config(tmp_path), tmp_path / "module.pt")
    assert not marker.exists(), "the import unpickled the file's code"
    rebuild, args = Trap(marker).__reduce__()  # what unpickling the file would have called
    rebuild(*args).close()
    assert marker.exists()  # the trap is real
