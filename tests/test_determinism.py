"""--deterministic: two CPU training runs with the same seed end with bit-identical weights; another seed does not."""
from pathlib import Path

import pytest
import torch

import main
from classification.utils import checkpoint as ckpt
from test_data import make_image_folder

BATCH_SIZE = 4
TRAIN_PER_CLASS = 6  # 2 classes x 6 images / batch 4 = 3 steps
# Everything random stays on: drop path, Mixup/CutMix, random erasing, random crops, EMA; one loader worker.
OPTS = ["MODEL.NUM_CLASSES", "2", "MODEL.DEFMAMBA.EMBED_DIM", "8", "MODEL.DEFMAMBA.DEPTHS", "[1, 1, 1, 1]",
        "MODEL.DEFMAMBA.DROP_PATH_RATE", "0.3", "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "1",
        "AUG.AUTO_AUGMENT", "''", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "1"]


@pytest.fixture
def restore_global_state(monkeypatch, isolated_logging):
    """main() configures the root logger and turns on deterministic algorithms: undo both afterwards."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # main sets it; monkeypatch restores the original
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn


def _train(data: Path, output: Path, seed: int) -> dict:
    assert main.main(["--data-path", str(data), "--output", str(output), "--amp", "off", "--deterministic",
                      "--seed", str(seed), "--scan-backend", "auto", "--batch-size", str(BATCH_SIZE),
                      "--opts", *OPTS]) == 0
    return ckpt.load_training_checkpoint(output / "defmamba_tiny" / "default" / ckpt.LATEST_NAME)


def test_same_seed_gives_bit_identical_weights(tmp_path, restore_global_state):
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=TRAIN_PER_CLASS, val_per_class=2)
    first = _train(data, tmp_path / "first", seed=3)
    assert torch.are_deterministic_algorithms_enabled()
    assert first["num_updates"] == 3
    second = _train(data, tmp_path / "second", seed=3)
    for part in ("model", "model_ema"):
        assert first[part].keys() == second[part].keys()
        for key, value in first[part].items():
            assert torch.equal(second[part][key], value), f"{part}.{key} differs between two runs with one seed"
    for index, state in first["optimizer"]["state"].items():
        assert torch.equal(second["optimizer"]["state"][index]["exp_avg_sq"], state["exp_avg_sq"])

    other = _train(data, tmp_path / "other", seed=4)  # the comparison can fail: another seed changes the weights
    assert any(not torch.equal(other["model"][key], value) for key, value in first["model"].items())
