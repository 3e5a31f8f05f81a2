"""Config: defaults, yaml/opts merging, errors that name the key or file, lr scaling, build_model mapping."""
import argparse
import inspect
import re
from pathlib import Path

import pytest
import torch
import yaml

from classification import config as config_module
from classification.config import ConfigError, get_config, get_defaults
from classification.models import build as build_module

REPO = Path(__file__).resolve().parents[1]


def _args(**kwargs) -> argparse.Namespace:
    return argparse.Namespace(**kwargs)


def test_every_default_key_has_a_comment():
    source = Path(config_module.__file__).read_text().splitlines()
    assignments = [line for line in source if re.match(r"_C(\.\w+)+ = ", line) and "CN()" not in line]
    assert len(assignments) > 50
    uncommented = [line for line in assignments if "  # " not in line]
    assert not uncommented, uncommented


def _yaml_leaves(node: dict, prefix: str = "") -> dict:
    leaves = {}
    for key, value in node.items():
        if isinstance(value, dict):
            leaves.update(_yaml_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def test_repo_yamls_load_and_hold_only_overrides():
    # Each family yaml names its variant, even where MODEL.TYPE / MODEL.NAME are the defaults' (DefMamba-T).
    identity_keys = {"MODEL.TYPE", "MODEL.NAME"}
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        cfg = get_config(_args(cfg=str(path)), world_size=1)
        assert cfg.is_frozen()
        assert cfg.MODEL.NAME.startswith(cfg.MODEL.TYPE), path
        leaves = _yaml_leaves(yaml.safe_load(path.read_text()))
        below = get_defaults()  # what the file's keys would be without it: the defaults and its BASE chain
        for base in leaves.pop("BASE", []):
            config_module.merge_yaml(below, path.parent / base)
        for key, value in leaves.items():
            if key in identity_keys:
                continue
            old = below
            for part in key.split("."):
                old = old[part]
            assert config_module._coerce(key, old, value, str(path)) != old, f"{path}: {key} repeats {old!r}"


def test_release_recipe_lr_scaling():
    cfg = get_config(_args(cfg=str(REPO / "configs/defmamba/tiny.yaml")), world_size=8)
    # 8 GPUs x 128 = 1024 images per update: lr 5e-4 x 2 = 1e-3, warm-up start and floor scale the same way.
    assert cfg.TRAIN.BASE_LR == pytest.approx(1e-3)
    assert cfg.TRAIN.WARMUP_LR == pytest.approx(1e-6)
    assert cfg.TRAIN.MIN_LR == pytest.approx(1e-5)
    accumulated = get_config(_args(batch_size=64, accumulation_steps=4), world_size=2)
    assert accumulated.TRAIN.BASE_LR == pytest.approx(5e-4 * 64 * 2 * 4 / 512)
    unscaled = get_config(_args(opts=["TRAIN.LR_REFERENCE_BATCH", "0"]), world_size=8)
    assert unscaled.TRAIN.BASE_LR == pytest.approx(5e-4)


def test_keys_derived_from_others_follow_them_unless_set():
    """MESA starts at int(0.25 x TRAIN.EPOCHS) as in the DAMamba release (derived where used: the frozen config keeps
    None); the resize interpolation is the family release's (DefMamba bilinear, DAMamba bicubic). Set, both keep their
    value."""
    damamba = str(REPO / "configs/damamba/tiny.yaml")
    assert config_module.mesa_start_epoch(get_config(_args(cfg=damamba), world_size=8)) == 75
    assert config_module.mesa_start_epoch(get_config(_args(cfg=damamba, opts=["TRAIN.EPOCHS", "100"]))) == 25
    explicit = get_config(_args(cfg=damamba, opts=["TRAIN.MESA.START_EPOCH", "3"]), world_size=8)
    assert config_module.mesa_start_epoch(explicit) == 3
    # The release truncates (int(0.25 x 7) = 1, not 2), and the start epoch itself has the term.
    seven = get_config(_args(cfg=damamba, opts=["TRAIN.EPOCHS", "7"]))
    weight = seven.TRAIN.MESA.WEIGHT
    assert weight > 0 and [config_module.mesa_weight(seven, epoch) for epoch in range(3)] == [0.0, weight, weight]
    assert get_config(_args(cfg=damamba), world_size=8).DATA.INTERPOLATION == "bicubic"
    assert get_config(_args(), world_size=8).DATA.INTERPOLATION == "bilinear"  # the defaults' DefMamba-T
    assert get_config(_args(opts=["DATA.INTERPOLATION", "bicubic"]), world_size=8).DATA.INTERPOLATION == "bicubic"
    with pytest.raises(ConfigError, match=r"TRAIN\.MESA\.START_EPOCH must be of type int \(like 0\) or None "
                                          r"\(derived\), got 'late'"):
        get_config(_args(opts=["TRAIN.MESA.START_EPOCH", "late"]))


def test_a_runs_config_given_again_trains_with_the_same_learning_rates(tmp_path):
    """The frozen config states its rates at its own total batch: its dump (a run's config.yaml) as --cfg gives the
    same rates at the same batch, and rescales them linearly for another one."""
    cfg = get_config(_args(cfg=str(REPO / "configs/demo/digits.yaml")), world_size=2)
    assert cfg.TRAIN.LR_REFERENCE_BATCH == 2 * cfg.DATA.BATCH_SIZE
    (tmp_path / "config.yaml").write_text(cfg.dump())
    again = get_config(_args(cfg=str(tmp_path / "config.yaml")), world_size=2)
    rates = ("BASE_LR", "WARMUP_LR", "MIN_LR")
    assert [again.TRAIN[key] for key in rates] == [cfg.TRAIN[key] for key in rates]
    one_process = get_config(_args(cfg=str(tmp_path / "config.yaml")), world_size=1)
    assert one_process.TRAIN.BASE_LR == pytest.approx(cfg.TRAIN.BASE_LR / 2)


def test_recipes_build_the_released_variants():
    """A family yaml builds its variant: the parameter counts of the released models (spec tables)."""
    from classification.models import build_model

    released_params = {"defmamba/tiny.yaml": 7_547_878, "defmamba/base.yaml": 48_595_576,
                       "damamba/small.yaml": 44_991_880}
    for name, params in released_params.items():
        cfg = get_config(_args(cfg=str(REPO / "configs" / name)), world_size=1)
        with torch.device("meta"):  # shapes only
            model = build_model(cfg)
        assert sum(p.numel() for p in model.parameters()) == params, name
    small = get_config(_args(cfg=str(REPO / "configs/damamba/small.yaml")), world_size=1)
    assert small.TRAIN.MESA.WEIGHT == 1.5 and config_module.mesa_start_epoch(small) == 75


def test_model_name_alone_selects_the_variant_and_set_keys_override_it():
    from classification.models import build_model

    base = get_config(_args(opts=["MODEL.NAME", "defmamba_base"]), world_size=1)
    with torch.device("meta"):
        model = build_model(base)
    assert sum(p.numel() for p in model.parameters()) == 48_595_576  # DefMamba-B, not the default DefMamba-T
    narrow = get_config(_args(opts=["MODEL.NAME", "defmamba_base", "MODEL.DEFMAMBA.EMBED_DIM", "32"]), world_size=1)
    with torch.device("meta"):
        model = build_model(narrow)
    assert model.num_features == 8 * 32 and len(model.stages[2].blocks) == 16  # B's depths, the set width
    reset = get_config(_args(cfg=str(REPO / "configs/demo/digits.yaml"), opts=["MODEL.DEFMAMBA.EMBED_DIM", "None"]),
                       world_size=1)
    assert reset.MODEL.DEFMAMBA.EMBED_DIM is None  # None gives a key back to the variant


def test_a_run_config_spells_out_the_variants_architecture():
    from classification.models import resolve_model_config

    small = get_config(_args(opts=["MODEL.TYPE", "damamba", "MODEL.NAME", "damamba_small",
                                   "MODEL.DAMAMBA.DEPTHS", "[1, 1, 2, 1]"]), world_size=1)
    resolved = resolve_model_config(small)
    assert resolved.is_frozen() and small.MODEL.DAMAMBA.DIMS is None  # a copy
    damamba = resolved.MODEL.DAMAMBA
    # DAMamba-S of the spec table; the set DEPTHS stays.
    assert damamba.DIMS == [96, 192, 384, 512] and damamba.MLP_RATIOS == [4.0, 4.0, 3.0, 3.0]
    assert damamba.LAYERSCALE == [2, 3] and damamba.DROP_PATH_RATE == 0.4 and damamba.DEPTHS == [1, 1, 2, 1]
    tiny = resolve_model_config(get_config(_args(), world_size=1)).MODEL.DEFMAMBA
    assert (tiny.EMBED_DIM, tiny.DEPTHS, tiny.DROP_PATH_RATE) == (48, [2, 2, 5, 2], 0.2)
    with pytest.raises(ConfigError, match="scan_branches must be"):  # the model's checks run first
        resolve_model_config(get_config(_args(opts=["MODEL.DEFMAMBA.SCAN_BRANCHES", "[zigzag]"]), world_size=1))
    # Widths that leave a layer without channels: named, not a torch error from deep inside a constructor.
    for opts, message in ((["MODEL.DEFMAMBA.EMBED_DIM", "1"], r"embed_dim must be >= 2 \(the stem's first conv"),
                          (["MODEL.DEFMAMBA.SSM_RATIO", "0.01"], r"ssm_ratio 0\.01 leaves no SSM channel at width")):
        with pytest.raises(ConfigError, match=message):
            resolve_model_config(get_config(_args(opts=opts), world_size=1))


def test_unknown_yaml_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("TRAIN:\n  EPOCS: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key TRAIN\.EPOCS; did you mean TRAIN\.EPOCHS\?"):
        get_config(_args(cfg=str(path)))


def test_a_file_that_is_not_yaml_text_is_named(tmp_path):
    """A checkpoint given as --cfg (binary, not UTF-8): one ConfigError, not a UnicodeDecodeError traceback."""
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": {}}, path)
    with pytest.raises(ConfigError, match=r"checkpoint_best\.pth is not a yaml text file \(not UTF-8: byte \d+ is "):
        get_config(_args(cfg=str(path)))


def test_wrong_type_names_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("TRAIN:\n  EPOCHS: many\n")
    with pytest.raises(ConfigError, match=r"TRAIN\.EPOCHS must be of type int"):
        get_config(_args(cfg=str(path)))
    with pytest.raises(ConfigError, match=r"MODEL\.DEFMAMBA\.DEPTHS\[1\]"):
        get_config(_args(opts=["MODEL.DEFMAMBA.DEPTHS", "[1, 'x', 1, 1]"]))
    with pytest.raises(ConfigError, match=r"TRAIN\.EMA\.ENABLE"):
        get_config(_args(opts=["TRAIN.EMA.ENABLE", "1"]))


def test_missing_yaml_names_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        get_config(_args(cfg=str(tmp_path / "nope.yaml")))
    (tmp_path / "child.yaml").write_text("BASE: ['nope.yaml']\n")
    with pytest.raises(ConfigError, match=r"child\.yaml: its BASE entry 'nope\.yaml' names .*nope\.yaml, which does "
                                          r"not exist \(BASE paths are relative to the file that holds them\)"):
        get_config(_args(cfg=str(tmp_path / "child.yaml")))


def test_unknown_opts_key_and_odd_opts():
    with pytest.raises(ConfigError, match=r"unknown config key TRAIN\.NOPE$"):  # nothing close: no guess
        get_config(_args(opts=["TRAIN.NOPE", "1"]))
    # A typo gets the key it most likely means, in a section name too; a key that is not a section gets no guess.
    for key, meant in (("MODEL.NUM_CLASS", "MODEL.NUM_CLASSES"), ("MODL.NUM_CLASSES", "MODEL.NUM_CLASSES"),
                       ("TRAIN.EMA.DECAI", "TRAIN.EMA.DECAY"), ("MODEL.num_classes", "MODEL.NUM_CLASSES")):
        with pytest.raises(ConfigError, match=rf"--opts: unknown config key {re.escape(key)}; did you mean "
                                              rf"{re.escape(meant)}\?"):
            get_config(_args(opts=[key, "1"]))
    for key in ("TRAIN.BASE_LR.X", "MODL.FOO"):  # the likely section has no such key: no guess
        with pytest.raises(ConfigError, match=rf"unknown config key {re.escape(key)}$"):
            get_config(_args(opts=[key, "1"]))
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        get_config(_args(opts=["TRAIN.EPOCHS"]))


def test_invalid_choice_and_inconsistent_mesa():
    with pytest.raises(ConfigError, match="AMP must be one of"):
        get_config(_args(opts=["AMP", "fp8"]))
    with pytest.raises(ConfigError, match="MESA"):
        get_config(_args(opts=["TRAIN.MESA.WEIGHT", "1.0", "TRAIN.EMA.ENABLE", "False"]))


def test_base_inheritance_coercion_and_precedence(tmp_path):
    (tmp_path / "base.yaml").write_text("TRAIN:\n  EPOCHS: 7\n  WEIGHT_DECAY: 0\nDATA:\n  IMG_SIZE: 64\n")
    (tmp_path / "child.yaml").write_text("BASE: ['base.yaml']\nTRAIN:\n  BASE_LR: 1e-3\nDATA:\n  IMG_SIZE: 32\n")
    cfg = get_config(_args(cfg=str(tmp_path / "child.yaml"), seed=3, opts=["TRAIN.EPOCHS", "9", "TAG", "007"]),
                     world_size=1)
    assert cfg.TRAIN.EPOCHS == 9  # --opts beat the yaml
    assert cfg.TRAIN.WEIGHT_DECAY == 0.0 and isinstance(cfg.TRAIN.WEIGHT_DECAY, float)  # int -> float
    assert cfg.TRAIN.BASE_LR == pytest.approx(1e-3 * 128 / 512)  # yaml's "1e-3" string read as a float
    assert cfg.DATA.IMG_SIZE == 32  # the child beats its base
    assert cfg.SEED == 3 and cfg.TAG == "007"
    assert get_defaults().TRAIN.EPOCHS == 300  # defaults untouched


def test_build_model_maps_every_family_key(monkeypatch):
    calls = []
    monkeypatch.setattr(build_module, "create_model", lambda name, **kwargs: calls.append((name, kwargs)))
    expected = {
        "defmamba": {"EMBED_DIM": ("embed_dim", 24), "DEPTHS": ("depths", (1, 2, 3, 4)), "D_STATE": ("d_state", 4),
                     "SSM_RATIO": ("ssm_ratio", 2.0), "MLP_RATIO": ("mlp_ratio", 3.0),
                     "DROP_RATE": ("drop_rate", 0.1), "DROP_PATH_RATE": ("drop_path_rate", 0.3),
                     "SCAN_BRANCHES": ("scan_branches", ("local", "deformable")), "LOCAL_WINDOW": ("local_window", 3),
                     "DEFORM_POINTS": ("deform_points", False), "DEFORM_ORDER": ("deform_order", False),
                     "OFFSET_BIAS": ("offset_bias", False),
                     "OFFSET_CHANNEL_ATTENTION": ("offset_channel_attention", False)},
        "damamba": {"DIMS": ("dims", (16, 32, 48, 64)), "DEPTHS": ("depths", (1, 1, 2, 1)),
                    "MLP_RATIOS": ("mlp_ratios", (2.0, 2.0, 3.0, 3.0)), "LAYERSCALE": ("layerscale", (3,)),
                    "DROP_PATH_RATE": ("drop_path_rate", 0.25)},
    }
    defaults = get_defaults()
    for family, keys in expected.items():
        assert set(keys) == set(defaults.MODEL[family.upper()]), f"a MODEL.{family.upper()} key is not mapped"
        opts = ["MODEL.TYPE", family, "MODEL.NAME", f"{family}_tiny", "MODEL.NUM_CLASSES", "7", "MODEL.IN_CHANS", "1",
                "THROUGHPUT_MODE", "True",  # IN_CHANS other than 3 is for throughput only (the data are RGB)
                "MODEL.SCAN_BACKEND", "ref"]
        for key, (_, value) in keys.items():
            opts += [f"MODEL.{family.upper()}.{key}", repr(list(value) if isinstance(value, tuple) else value)]
        build_module.build_model(get_config(_args(opts=opts), world_size=1))
        name, kwargs = calls.pop()
        assert name == f"{family}_tiny"
        assert kwargs == {"num_classes": 7, "in_chans": 1, "scan_backend": "ref",
                          **{kwarg: value for kwarg, value in keys.values()}}


def test_set_family_defaults_are_the_constructors_defaults():
    """A MODEL.<FAMILY> key that is not None by default repeats the constructor's default (the released model's): the
    two must not drift apart, or a model built from the config would differ from one built in Python."""
    from classification.models import DAMamba, DefMamba

    defaults = get_defaults()
    for family, model_class in (("defmamba", DefMamba), ("damamba", DAMamba)):
        parameters = inspect.signature(model_class.__init__).parameters
        for key, argument in build_module.FAMILY_ARGUMENTS[family].items():
            value = defaults.MODEL[config_module.MODEL_SECTIONS[family]][key]
            if value is not None:
                expected = parameters[argument].default
                assert (tuple(value) if isinstance(value, list) else value) == expected, (family, key)


def test_build_model_rejects_name_of_other_family():
    cfg = get_config(_args(opts=["MODEL.TYPE", "damamba", "MODEL.NAME", "defmamba_tiny"]), world_size=1)
    with pytest.raises(ValueError, match="not a 'damamba' variant"):
        build_module.build_model(cfg)


def test_real_tiny_defmamba_is_built_from_config():
    from classification.models import build_model

    cfg = get_config(_args(opts=["MODEL.NUM_CLASSES", "3", "MODEL.DEFMAMBA.EMBED_DIM", "8",
                                 "MODEL.DEFMAMBA.DEPTHS", "[1, 1, 1, 1]"]), world_size=1)
    model = build_model(cfg)
    assert model.num_features == 64 and model.num_classes == 3


@pytest.mark.parametrize("opts, message", [
    (["DATA.INTERPOLATION", "foo"], r"DATA\.INTERPOLATION must be one of \(.*'bicubic'.*\), got 'foo'"),
    (["AUG.AUTO_AUGMENT", "bogus"], r"AUG\.AUTO_AUGMENT .*'rand-\.\.\.'.*'augmix-\.\.\.'.*, got 'bogus'"),
    (["AUG.AUTO_AUGMENT", "rand-q9"], r"AUG\.AUTO_AUGMENT .*got 'rand-q9' \(timm: Unknown RandAugment config section"),
    (["AUG.AUTO_AUGMENT", "rand-m9-mstd0.5-inc"], r"got 'rand-m9-mstd0\.5-inc'.*would ignore the sections \['inc'\]"),
    (["AUG.AUTO_AUGMENT", "augmix-xyz"], r"timm would ignore the sections \['xyz'\] \(they hold no number"),
    (["AUG.AUTO_AUGMENT", "rand-m9-tweight"], r"ignore the sections \['tweight'\] .*transform-set sections are"),
    (["TRAIN.OPTIMIZER.BETAS", "(0.9,)"], r"TRAIN\.OPTIMIZER\.BETAS must be two floats in \[0, 1\), got \(0\.9,\)"),
    (["TRAIN.OPTIMIZER.BETAS", "(0.9, 1.0)"], r"TRAIN\.OPTIMIZER\.BETAS must be two floats in \[0, 1\)"),
    (["MODEL.DEFMAMBA.DROP_PATH_RATE", "2.0"], r"MODEL\.DEFMAMBA\.DROP_PATH_RATE must be in \[0, 1\), got 2\.0"),
    (["MODEL.DAMAMBA.DROP_PATH_RATE", "-0.1"], r"MODEL\.DAMAMBA\.DROP_PATH_RATE must be in \[0, 1\), got -0\.1"),
    (["MODEL.DEFMAMBA.DROP_RATE", "1.0"], r"MODEL\.DEFMAMBA\.DROP_RATE must be in \[0, 1\), got 1\.0"),
    (["MODEL.LABEL_SMOOTHING", "1.0"], r"MODEL\.LABEL_SMOOTHING must be in \[0, 1\), got 1\.0"),
    (["AUG.HFLIP", "1.5"], r"AUG\.HFLIP must be in \[0, 1\], got 1\.5"),
    (["TRAIN.WARMUP_EPOCHS", "-1"], r"TRAIN\.WARMUP_EPOCHS must be >= 0, got -1"),
    (["TRAIN.START_EPOCH", "-1"], r"TRAIN\.START_EPOCH must be >= 0, got -1"),
    (["TRAIN.SAVE_STEPS", "-5"], r"TRAIN\.SAVE_STEPS must be >= 0, got -5"),
    (["DATA.NUM_WORKERS", "-1"], r"DATA\.NUM_WORKERS must be >= 0, got -1"),
    (["TRAIN.MESA.START_EPOCH", "-1"], r"TRAIN\.MESA\.START_EPOCH must be >= 0, got -1"),
    (["THROUGHPUT_ITERS", "0"], r"THROUGHPUT_ITERS must be positive, got 0"),
    (["AUG.RECOUNT", "0"], r"AUG\.RECOUNT must be positive, got 0"),
    (["MODEL.NUM_CLASSES", "-1"], r"MODEL\.NUM_CLASSES must be >= 0, got -1"),
    (["MODEL.DEFMAMBA.EMBED_DIM", "-4"], r"MODEL\.DEFMAMBA\.EMBED_DIM must be >= 1 \(each entry\), got -4"),
    (["MODEL.DAMAMBA.DEPTHS", "[1, 0, 1, 1]"], r"MODEL\.DAMAMBA\.DEPTHS must be >= 1 \(each entry\), got \[1, 0,"),
    (["MODEL.IN_CHANS", "1"], r"MODEL\.IN_CHANS must be 3 .*RGB.*got 1"),
    (["MODEL.IN_CHANS", "1", "EVAL_MODE", "True"], r"MODEL\.IN_CHANS must be 3"),
    (["TAG", "../../escape"], r"TAG \(--tag\) must be a folder name, without / or \\ and not \. or \.\., got "),
    (["TAG", ".."], r"TAG \(--tag\) must be a folder name"),
    (["EVAL_MODE", "True", "THROUGHPUT_MODE", "True"], r"--eval\) and THROUGHPUT_MODE \(--throughput\) are separate"),
    (["SEED", "-1"], r"SEED must be in \[0, 4294967295\] .*got -1"),
    (["SEED", "4294967296"], r"SEED must be in \[0, 4294967295\] .*got 4294967296"),
    (["AUG.SCALE", "[0.5]"], r"AUG\.SCALE must be two floats lo, hi with 0 < lo <= hi <= 1 .*got \(0\.5,\)"),
    (["AUG.SCALE", "[1.0, 0.5]"], r"AUG\.SCALE must be two floats .*got \(1\.0, 0\.5\)"),
    (["AUG.SCALE", "[0.0, 1.0]"], r"AUG\.SCALE must be two floats .*got \(0\.0, 1\.0\)"),
    (["AUG.SCALE", "[0.5, 1.5]"], r"AUG\.SCALE must be two floats .*got \(0\.5, 1\.5\)"),
    (["AUG.MIXUP", "0.5", "DATA.BATCH_SIZE", "63"], r"DATA\.BATCH_SIZE must be even with Mixup/CutMix on .*got 63"),
    (["AUG.MIXUP", "0.0", "AUG.MIXUP_PROB", "0.0", "AUG.MIXUP_MODE", "elem", "DATA.BATCH_SIZE", "3"],
     r"DATA\.BATCH_SIZE must be even .*AUG\.CUTMIX 1\.0.*got 3"),  # timm asserts whatever the mode and probability
    (["AUG.REMODE", "foo", "AUG.REPROB", "0.5"], r"AUG\.REMODE must be one of \('const', 'rand', 'pixel'\), got 'foo'"),
    (["AUG.MIXUP_MODE", "half"], r"AUG\.MIXUP_MODE must be one of \('batch', 'pair', 'elem'\), got 'half'"),
    (["TRAIN.EMA.DECAY", "2.0"], r"TRAIN\.EMA\.DECAY must be in \[0, 1\), got 2\.0"),
    (["TRAIN.EMA.DECAY", "1.0"], r"TRAIN\.EMA\.DECAY must be in \[0, 1\), got 1\.0"),  # would freeze the EMA
    (["TRAIN.START_EPOCH", "5", "TRAIN.EPOCHS", "1"], r"TRAIN\.START_EPOCH 5 must be below TRAIN\.EPOCHS 1"),
    (["TRAIN.START_EPOCH", "5", "TRAIN.EPOCHS", "5"], r"TRAIN\.START_EPOCH 5 must be below TRAIN\.EPOCHS 5"),
    (["TRAIN.LR_REFERENCE_BATCH", "0", "TRAIN.MIN_LR", "1.0", "TRAIN.BASE_LR", "0.002"],
     r"TRAIN\.MIN_LR 1 is above TRAIN\.BASE_LR 0\.002 \(both as scaled to the total batch\): the cosine schedule "
     r"would raise"),
    (["MODEL.DAMAMBA.DIMS", "[16, 16, 16, 16]"],
     r"MODEL\.DAMAMBA\.DIMS=\[16, 16, 16, 16\]: the MODEL\.DAMAMBA\.\* keys only apply to MODEL\.TYPE 'damamba', but "
     r"MODEL\.TYPE is 'defmamba'"),
    (["MODEL.TYPE", "damamba", "MODEL.NAME", "damamba_tiny", "MODEL.DEFMAMBA.D_STATE", "4",
      "MODEL.DEFMAMBA.DEFORM_ORDER", "False"],
     r"MODEL\.DEFMAMBA\.D_STATE=4, MODEL\.DEFMAMBA\.DEFORM_ORDER=False: .* MODEL\.TYPE is 'damamba'"),
])
def test_invalid_value_names_key_value_and_allowed(opts, message):
    with pytest.raises(ConfigError, match=message):
        get_config(_args(opts=opts), world_size=1)


def test_seed_bound_depends_on_the_number_of_processes():
    highest = 2**32 - 8  # ranks 0..7 seed numpy with SEED + rank <= 2**32 - 1
    assert get_config(_args(seed=highest), world_size=8).SEED == highest
    with pytest.raises(ConfigError, match=rf"SEED must be in \[0, {highest}\] \(each of the 8 process\(es\)"):
        get_config(_args(seed=highest + 1), world_size=8)


def test_training_only_checks_leave_eval_and_throughput_alone():
    for opts in (["TRAIN.START_EPOCH", "5", "TRAIN.EPOCHS", "1"], ["DATA.BATCH_SIZE", "63"]):
        for mode in ("EVAL_MODE", "THROUGHPUT_MODE"):
            get_config(_args(opts=[*opts, mode, "True"]), world_size=1)
    no_mix = get_config(_args(opts=["DATA.BATCH_SIZE", "63", "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0"]), world_size=1)
    assert no_mix.DATA.BATCH_SIZE == 63
    assert get_config(_args(opts=["TRAIN.EMA.DECAY", "0.0"]), world_size=1).TRAIN.EMA.DECAY == 0.0


def test_damamba_training_batch_of_one_is_refused_before_the_run():
    from classification.models import resolve_model_config

    # 32x32 ends in 1x1 maps in DAMamba's last stage, where BatchNorm needs more than one image.
    opts = ["MODEL.TYPE", "damamba", "MODEL.NAME", "damamba_tiny", "DATA.IMG_SIZE", "32", "DATA.BATCH_SIZE", "1",
            "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0"]
    with pytest.raises(ConfigError, match=r"DATA\.BATCH_SIZE 1 with DATA\.IMG_SIZE 32 cannot train MODEL\.NAME "
                                          r"'damamba_tiny': training with batch 1"):
        resolve_model_config(get_config(_args(opts=opts), world_size=1))
    resolve_model_config(get_config(_args(opts=opts, eval=True), world_size=1))  # eval mode: running statistics
    resolve_model_config(get_config(_args(opts=[*opts, "DATA.IMG_SIZE", "64"]), world_size=1))  # 2x2 maps


def test_accepted_augmentation_values_build_the_data_transforms():
    from classification.data.build import build_transform

    for interpolation in config_module.INTERPOLATIONS:
        cfg = get_config(_args(opts=["DATA.INTERPOLATION", interpolation, "DATA.IMG_SIZE", "32"]), world_size=1)
        build_transform(cfg, is_train=True)
        build_transform(cfg, is_train=False)
    for policy in ["", "rand-m9-mstd0.5-inc1", "rand-m9-n3-tweights", "augmix-m5-w4-d2", "original", "v0r-mstd0.5",
                   "3a"]:
        cfg = get_config(_args(opts=["AUG.AUTO_AUGMENT", policy, "DATA.IMG_SIZE", "32"]), world_size=1)
        assert cfg.AUG.AUTO_AUGMENT == policy
        build_transform(cfg, is_train=True)
    off = get_config(_args(opts=["AUG.AUTO_AUGMENT", "none"]), world_size=1)
    assert off.AUG.AUTO_AUGMENT == ""  # Swin-style "none" means off, as "" does
    cfg = get_config(_args(opts=["TRAIN.OPTIMIZER.BETAS", "[0.0, 0.5]", "TRAIN.WARMUP_EPOCHS", "0"]), world_size=1)
    assert cfg.TRAIN.OPTIMIZER.BETAS == (0.0, 0.5) and cfg.TRAIN.WARMUP_EPOCHS == 0
    # --throughput times random tensors, not RGB images: any channel count.
    assert get_config(_args(opts=["MODEL.IN_CHANS", "1"], throughput=True), world_size=1).MODEL.IN_CHANS == 1


def test_base_given_as_a_string(tmp_path):
    (tmp_path / "base.yaml").write_text("TRAIN:\n  EPOCHS: 7\n")
    (tmp_path / "child.yaml").write_text("BASE: base.yaml\nDATA:\n  IMG_SIZE: 32\n")
    cfg = get_config(_args(cfg=str(tmp_path / "child.yaml")), world_size=1)
    assert cfg.TRAIN.EPOCHS == 7 and cfg.DATA.IMG_SIZE == 32
    (tmp_path / "bad.yaml").write_text("BASE: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: BASE must be a yaml path or a list of them, got 3"):
        get_config(_args(cfg=str(tmp_path / "bad.yaml")))
    # BASE belongs to yaml files: not a key of the config, so --opts cannot set it (it would do nothing).
    with pytest.raises(ConfigError, match=r"--opts: BASE is only read inside a yaml file .* give the file with --cfg"):
        get_config(_args(opts=["BASE", "['base.yaml']"]))
    assert "BASE" not in cfg


def test_base_cycle_names_the_files(tmp_path):
    (tmp_path / "self.yaml").write_text("BASE: ['self.yaml']\n")
    with pytest.raises(ConfigError, match=r"BASE cycle: .*self\.yaml -> .*self\.yaml"):
        get_config(_args(cfg=str(tmp_path / "self.yaml")))
    (tmp_path / "a.yaml").write_text("BASE: ['b.yaml']\n")
    (tmp_path / "b.yaml").write_text("BASE: ['sub/c.yaml']\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("BASE: ['../a.yaml']\n")
    with pytest.raises(ConfigError, match=r"BASE cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml"):
        get_config(_args(cfg=str(tmp_path / "a.yaml")))
    # Two bases sharing a base (a diamond) is not a cycle.
    (tmp_path / "root.yaml").write_text("TRAIN:\n  EPOCHS: 5\n")
    (tmp_path / "left.yaml").write_text("BASE: root.yaml\n")
    (tmp_path / "right.yaml").write_text("BASE: root.yaml\nDATA:\n  IMG_SIZE: 48\n")
    (tmp_path / "top.yaml").write_text("BASE: [left.yaml, right.yaml]\n")
    cfg = get_config(_args(cfg=str(tmp_path / "top.yaml")), world_size=1)
    assert cfg.TRAIN.EPOCHS == 5 and cfg.DATA.IMG_SIZE == 48


def test_opts_section_is_not_a_key(tmp_path):
    with pytest.raises(ConfigError, match=r"--opts: TRAIN is a section, not a key; set one of its keys, e\.g\. "
                                          r"TRAIN\.START_EPOCH, TRAIN\.EPOCHS"):
        get_config(_args(opts=["TRAIN", "3"]))
    with pytest.raises(ConfigError, match=r"TRAIN\.OPTIMIZER is a section, not a key.*TRAIN\.OPTIMIZER\.EPS"):
        get_config(_args(opts=["TRAIN.OPTIMIZER", "3"]))
    path = tmp_path / "bad.yaml"
    path.write_text("TRAIN: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: TRAIN is a section, not a key.*TRAIN\.EPOCHS"):
        get_config(_args(cfg=str(path)))


def test_build_model_turns_constructor_errors_into_config_errors():
    cfg = get_config(_args(opts=["MODEL.DEFMAMBA.DEPTHS", "[1, 1]"]), world_size=1)
    with pytest.raises(ConfigError, match=r"MODEL.NAME 'defmamba_tiny' with the MODEL.DEFMAMBA.\* keys: depths"):
        build_module.build_model(cfg)
    cfg = get_config(_args(opts=["MODEL.NAME", "defmamba_huge"]), world_size=1)
    with pytest.raises(ConfigError, match="unknown model 'defmamba_huge'; available: "):
        build_module.build_model(cfg)


def test_opts_values_as_python_literals_or_yaml_flow_lists():
    cfg = get_config(_args(opts=["MODEL.DEFMAMBA.SCAN_BRANCHES", "[forward, local]", "AUG.SCALE", "(0.5, 1.0)",
                                 "TAG", "run:[a]", "MODEL.DEFMAMBA.DEPTHS", "None"]), world_size=1)
    assert cfg.MODEL.DEFMAMBA.SCAN_BRANCHES == ["forward", "local"]  # yaml flow syntax, as in a yaml file
    assert cfg.AUG.SCALE == (0.5, 1.0) and cfg.MODEL.DEFMAMBA.DEPTHS is None
    assert cfg.TAG == "run:[a]"  # a string key takes the text as given
    for text in ("2024-06-31", "[2024-02-30]", "a: b", "{x}", "null"):  # yaml would build a date, a dict, None
        assert get_config(_args(opts=["TAG", text]), world_size=1).TAG == text
    with pytest.raises(ConfigError, match=r"TRAIN\.EPOCHS must be of type int \(like 300\), got 'abc'"):
        get_config(_args(opts=["TRAIN.EPOCHS", "abc"]))


def test_a_minimum_learning_rate_equal_to_the_base_one_is_a_constant_schedule():
    config = get_config(_args(opts=["TRAIN.LR_REFERENCE_BATCH", "0", "TRAIN.MIN_LR", "0.002", "TRAIN.BASE_LR",
                                    "0.002"]), world_size=1)
    assert config.TRAIN.MIN_LR == config.TRAIN.BASE_LR == pytest.approx(0.002)
