"""load_checkpoint: released and own formats, wrappers, clear errors; the converter is a pure renaming."""
import logging
import re

import numpy as np
import pytest
import timm
import torch

from classification.models import CheckpointError, DefMamba, create_model, has_ema_weights, load_checkpoint
from classification.models.checkpoint import extract_state_dict, get_checkpoint_filter, key_rules, rename_key
from classification.models.defmamba import checkpoint_filter_fn

SMALL = dict(embed_dim=16, depths=(1, 1, 2, 1), num_classes=10)


@pytest.fixture(scope="module")
def released(fixtures_dir):
    return torch.load(fixtures_dir / "official_defmamba_dev.pt", weights_only=False)["state_dict"]


def small_model(**overrides) -> DefMamba:
    return DefMamba(**{**SMALL, **overrides})


def assert_weights_equal(model: DefMamba, released: dict) -> None:
    ours = model.state_dict()
    converted = checkpoint_filter_fn(released, model)
    assert converted.keys() == ours.keys()
    for key, value in converted.items():
        assert torch.equal(ours[key], value), key


# The key prefix of a torch.compile'd module (compiling is lazy: nothing is compiled here).
COMPILED_PREFIX = next(iter(torch.compile(torch.nn.Linear(1, 1)).state_dict())).removesuffix("weight")


@pytest.mark.parametrize("wrapper", ["bare", "model", "state_dict", "module_prefix", "compiled", "compiled_in_ddp"])
def test_released_formats(released, wrapper):
    checkpoint = {
        "bare": released,
        "model": {"model": released, "epoch": 3, "optimizer": {}},
        "state_dict": {"state_dict": released},
        "module_prefix": {"model": {f"module.{key}": value for key, value in released.items()}},
        # A torch.compile'd model's state dict, also inside DDP.
        "compiled": {f"{COMPILED_PREFIX}{key}": value for key, value in released.items()},
        "compiled_in_ddp": {f"module.{COMPILED_PREFIX}{key}": value for key, value in released.items()},
    }[wrapper]
    model = small_model()
    load_checkpoint(model, checkpoint)
    assert_weights_equal(model, released)


def test_wrapper_prefixes_are_stripped_where_they_can_be_told_apart_from_module_names():
    """DDP's module. and torch.compile's prefix go however nested at the start of a key; further in, module. stays (a
    submodule may be called "module") and the compile prefix of a submodule compiled on its own goes."""
    weight = torch.ones(2)
    unwrapped = extract_state_dict({
        f"module.{COMPILED_PREFIX}weight": weight,  # compiled inside DDP
        f"{COMPILED_PREFIX}module.norm.weight": weight,  # DDP inside compiled
        "module.bias": weight,
        "module.blocks.module.weight": weight,
        "stages.module.weight": weight,
        f"stages.0.{COMPILED_PREFIX}blocks.0.weight": weight,  # model.stages[0] = torch.compile(model.stages[0])
    })
    assert list(unwrapped) == ["weight", "norm.weight", "bias", "blocks.module.weight", "stages.module.weight",
                               "stages.0.blocks.0.weight"]


def test_use_ema_picks_the_ema_weights(released):
    noisy = {key: value + 1 for key, value in released.items()}
    model = small_model()
    load_checkpoint(model, {"model": noisy, "model_ema": released}, use_ema=True)
    assert_weights_equal(model, released)
    with pytest.raises(CheckpointError, match="model_ema"):
        load_checkpoint(model, {"model": released}, use_ema=True)
    # A file of EMA weights alone: the error says how to load them.
    with pytest.raises(CheckpointError, match=r"it holds only EMA weights: load them with use_ema=True"):
        load_checkpoint(small_model(), {"model_ema": released, "epoch": 3})
    model = small_model()
    load_checkpoint(model, {"model_ema": released, "epoch": 3}, use_ema=True)
    assert_weights_equal(model, released)
    # timm's names: state_dict and state_dict_ema; "model" is preferred to "state_dict" when both are there.
    model = small_model()
    assert has_ema_weights({"state_dict": noisy, "state_dict_ema": released})
    load_checkpoint(model, {"state_dict": noisy, "state_dict_ema": released}, use_ema=True)
    assert_weights_equal(model, released)
    load_checkpoint(model, {"model": released, "state_dict": noisy})
    assert_weights_equal(model, released)


def test_own_checkpoint_file_round_trip(tmp_path, released):
    source = small_model()
    load_checkpoint(source, released)
    path = tmp_path / "ours.pth"
    torch.save({"model": source.state_dict(), "epoch": 1}, path)
    target = small_model()
    load_checkpoint(target, path, weights_only=True)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_missing_corrupt_and_truncated_files(tmp_path, released):
    model = small_model()
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(model, tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match=rf"{tmp_path} is a folder: give a checkpoint file \(this folder holds no "
                                              r"\.pth file\)"):
        load_checkpoint(model, tmp_path)
    path = tmp_path / "full.pth"
    torch.save({"model": released}, path)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    truncated_error = r"truncated\.pth is truncated: a torch\.save file without its end"
    with pytest.raises(CheckpointError, match=truncated_error):
        load_checkpoint(model, truncated)
    with pytest.raises(CheckpointError, match=truncated_error):  # timm's route too, which reads the file itself
        timm.create_model("defmamba_tiny", pretrained=True, **SMALL,
                          pretrained_cfg_overlay=dict(file=str(truncated), num_classes=SMALL["num_classes"]))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(model, garbage)


def test_a_bit_flip_is_caught_unless_the_file_was_saved_without_crcs(tmp_path, released, flip_record_bit):
    path = tmp_path / "flipped.pth"
    torch.save({"model": released}, path)
    flip_record_bit(path, "data/0")
    with pytest.raises(CheckpointError, match=r"flipped.pth is corrupt: its record \S+/data/0 fails the CRC-32"):
        load_checkpoint(small_model(), path)
    # A file written without CRCs stores 0 for every record: nothing to check, so it loads.
    unchecked = tmp_path / "unchecked.pth"
    saved_option = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"model": released}, unchecked)
    finally:
        torch.serialization.set_crc32_options(saved_option)
    model = small_model()
    load_checkpoint(model, unchecked)
    assert_weights_equal(model, released)


def test_weights_only_names_what_it_refuses(tmp_path, released):
    path = tmp_path / "training.pth"
    torch.save({"model": released, "rng": np.random.get_state()}, path)  # numpy state, as our training checkpoints
    with pytest.raises(CheckpointError, match="training.pth holds objects other than tensors .* weights_only=False"):
        load_checkpoint(small_model(), path, weights_only=True)
    model = small_model()
    load_checkpoint(model, path, weights_only=False)
    assert_weights_equal(model, released)


def test_new_classifier_keeps_the_models_own_when_the_class_count_differs(released, caplog):
    classes = released["classifier.head.weight"].shape[0]
    with pytest.raises(CheckpointError, match=rf"shape mismatches \[head\.fc\.weight.*only the classifier differs: "
                                              rf"it has {classes} classes; build the model with as many to use it "
                                              r"\(MODEL.NUM_CLASSES\), or load with new_classifier=True"):
        load_checkpoint(small_model(num_classes=12), released)
    with pytest.raises(CheckpointError) as other_width:  # more than the classifier: another variant, said first
        load_checkpoint(small_model(embed_dim=32, num_classes=12), released)
    assert "only the classifier differs" not in str(other_width.value)
    assert re.search(r"does not fit DefMamba: its weights have the model's names but other shapes: a checkpoint of "
                     r"other widths or depths\? .* \d+ shape mismatches", str(other_width.value))
    model = small_model(num_classes=12)
    initial_head = {key: value.clone() for key, value in model.state_dict().items() if key.startswith("head.fc.")}
    with caplog.at_level(logging.WARNING):
        result = load_checkpoint(model, released, new_classifier=True)
    assert set(result.missing_keys) == set(initial_head) and not result.unexpected_keys
    assert "head.fc.* keeps its initialisation" in caplog.text
    converted = checkpoint_filter_fn(released, model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, initial_head[key] if key in initial_head else converted[key]), key
    same = small_model()  # the same class count: the classifier loads as usual
    load_checkpoint(same, released, new_classifier=True)
    assert_weights_equal(same, released)
    caplog.clear()
    with pytest.raises(CheckpointError, match=r"shape mismatches \[stem"):  # only the classifier may differ
        load_checkpoint(small_model(embed_dim=32, num_classes=12), released, new_classifier=True)
    assert "keeps its initialisation" not in caplog.text  # nothing said about fine-tuning a load that failed
    headless = small_model(num_classes=0)
    with caplog.at_level(logging.WARNING):
        load_checkpoint(headless, released, new_classifier=True)
    assert "is left out: the model has none (num_classes 0)" in caplog.text


def test_new_classifier_loads_a_checkpoint_without_any_classifier(caplog):
    source, target = small_model(), small_model(num_classes=9)
    own_fc = {key: value.clone() for key, value in target.state_dict().items() if key.startswith("head.fc.")}
    headless = {key: value for key, value in source.state_dict().items() if not key.startswith("head.fc.")}
    with caplog.at_level(logging.WARNING):
        load_checkpoint(target, headless, new_classifier=True)
    assert "it holds no classifier: head.fc.* keeps its initialisation" in caplog.text
    loaded = target.state_dict()
    for key, value in headless.items():
        assert torch.equal(loaded[key], value), key
    for key, value in own_fc.items():
        assert torch.equal(loaded[key], value), key


def test_other_variant_fails_listing_the_shape_mismatches(released):
    with pytest.raises(CheckpointError, match=r"shape mismatches \[stem.conv1.weight"):
        load_checkpoint(small_model(embed_dim=32), released)


def test_missing_and_unexpected_keys_are_listed(released):
    partial = {key: value for key, value in released.items() if not key.startswith("layers.3")}
    with pytest.raises(CheckpointError, match=r"missing keys \[stages.3.blocks.0.norm1.weight.*in all\)\]"):
        load_checkpoint(small_model(), partial)
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \[extra.weight\]"):
        load_checkpoint(small_model(), {**released, "extra.weight": torch.zeros(1)})
    model = small_model()
    result = load_checkpoint(model, partial, strict=False)
    assert len(result.missing_keys) == len(released) - len(partial) and not result.unexpected_keys


def test_deeper_variant_misses_blocks(released):
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(small_model(depths=(1, 1, 3, 1)), released)


def test_the_other_family_hint_needs_fewer_than_half_of_the_keys():
    class Four(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)  # 4 keys

    half = {key: value for key, value in Four().state_dict().items() if key.startswith("a.")}  # exactly 2 of 4
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(Four(), half)
    assert "it holds only" not in str(error.value) and "2 missing keys" in str(error.value)
    with pytest.raises(CheckpointError, match="it holds only 1 of the model's 4 keys"):
        load_checkpoint(Four(), {"a.weight": half["a.weight"]})


def test_converter_is_key_by_key_renaming(released):
    model = small_model()
    full = checkpoint_filter_fn(released, model)
    assert len(full) == len(released)
    assert set(full) == set(model.state_dict())
    subset = dict(list(released.items())[::7])
    converted = checkpoint_filter_fn(subset, model)
    assert converted == {key: full[key] for key in converted}
    assert checkpoint_filter_fn(full, model) == full  # our own names pass through
    spot = {
        "patch_embed.7.bias": "stem.norm2.bias",
        "layers.0.downsample.1.weight": "stages.1.downsample.conv.weight",
        "layers.2.blocks.1.op.DS.conv_offset.ca.2.bias":
            "stages.2.blocks.1.mixer.deformable.offset_net.channel_attention.fc2.bias",
        "layers.2.blocks.1.op.A_logs": "stages.2.blocks.1.mixer.A_log",
        "classifier.head.weight": "head.fc.weight",
    }
    for released_key, our_key in spot.items():
        assert checkpoint_filter_fn({released_key: released[released_key]}, model) == {our_key: released[released_key]}


def test_rename_key_takes_the_first_rule_matching_the_whole_key():
    rules = key_rules([
        (r"a\.(\d+)\.w", r"b.\1.w"),
        (r"a\.(\d+)\.(.*)", lambda match: f"c.{int(match[1]) + 1}.{match[2]}"),
    ])
    assert rename_key("a.3.w", rules) == "b.3.w"  # both match: the first wins
    assert rename_key("a.3.wx", rules) == "c.4.wx"  # the first matches only a prefix
    assert rename_key("xa.3.w", rules) == "xa.3.w"  # no whole match: unchanged


def test_a_subclass_of_a_registered_family_uses_its_checkpoint_filter():
    class Tweaked(DefMamba):
        pass

    assert get_checkpoint_filter(Tweaked(**SMALL)) is checkpoint_filter_fn


def test_timm_create_model_and_pretrained_filter(released):
    import timm

    model = timm.create_model("defmamba_tiny", embed_dim=16, depths=(1, 1, 2, 1), num_classes=10)
    load_checkpoint(model, released)
    assert_weights_equal(model, released)
    assert create_model("defmamba_tiny").pretrained_cfg["classifier"] == "head.fc"
