"""Engine: optimizer groups, schedule values, accumulation (a last partial group too), clipping (fp16 gradients
unscaled first), MESA, NaN stop, evaluation metrics, throughput."""
import argparse
import copy
import logging
import math

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn

from classification.config import ConfigError, get_config
from classification.engine import (
    NonFiniteLossError,
    TrainingStopped,
    evaluate,
    throughput,
    train_one_epoch,
    warn_if_slow_autocast,
)
from classification.lr_scheduler import build_scheduler
from classification.models import build_model
from classification.optim import build_optimizer, split_weight_decay


NUM_STAGES = 4
# The per-block SSM parameters with two or more dimensions (A_log, the dt bias, the offset-bias table): decayed like
# the release unless TRAIN.NO_DECAY_SSM.
SSM_MATRICES = ("A_log", "dt_bias", "deformable.offset_bias_table")


def _config(*opts: str):
    return get_config(argparse.Namespace(opts=list(opts)), world_size=1)


class Toy(nn.Module):
    """A linear classifier with a tagged SSM-like parameter and an untagged one of the same kind."""

    def __init__(self, features: int = 6, classes: int = 3):
        super().__init__()
        self.fc = nn.Linear(features, classes)
        self.norm = nn.LayerNorm(features)
        self.A_log = nn.Parameter(torch.zeros(classes, 2))  # untagged: a name alone exempts nothing
        self.table = nn.Parameter(torch.zeros(classes, 2, 2))  # tagged
        self.table._no_weight_decay = True

    def forward(self, x):
        return self.fc(self.norm(x)) + self.A_log.sum(-1) + self.table.sum((1, 2))


def test_weight_decay_groups_of_defmamba():
    cfg = _config("MODEL.NUM_CLASSES", "3", "MODEL.DEFMAMBA.EMBED_DIM", "8", "MODEL.DEFMAMBA.DEPTHS", "[1, 1, 1, 1]")
    model = build_model(cfg)
    decay, no_decay = split_weight_decay(model, no_decay_ssm=False)
    params = dict(model.named_parameters())
    assert all(params[n].ndim <= 1 or n.endswith(".bias") for n in no_decay)
    assert all(params[n].ndim >= 2 and not n.endswith(".bias") for n in decay)
    assert set(decay) | set(no_decay) == set(params)
    tagged = {n for n, p in params.items() if getattr(p, "_no_weight_decay", False)}
    tagged_matrices = {n for n in tagged if params[n].ndim >= 2}
    assert tagged_matrices and tagged_matrices <= set(decay)  # the release decays A_log and the offset-bias table
    decay_ssm, no_decay_ssm = split_weight_decay(model, no_decay_ssm=True)
    assert set(no_decay_ssm) == set(no_decay) | tagged
    assert any("A_log" in n for n in tagged_matrices) and any("offset" in n for n in tagged_matrices)
    # NO_DECAY_SSM exempts exactly the SSM matrices that decay by default, one set per block; the rest keeps decaying.
    ssm_matrices = {f"stages.{stage}.blocks.0.mixer.{leaf}" for stage in range(NUM_STAGES) for leaf in SSM_MATRICES}
    assert set(decay) - set(decay_ssm) == ssm_matrices
    assert decay_ssm == [n for n in decay if n not in ssm_matrices]
    optimizer = build_optimizer(_config("TRAIN.NO_DECAY_SSM", "True"), model)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(params)
    decay_group = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert decay_group == {id(params[n]) for n in decay if n not in ssm_matrices}


def test_the_optimizer_takes_its_hyperparameters_from_the_config():
    cfg = _config("TRAIN.OPTIMIZER.EPS", "1e-6", "TRAIN.OPTIMIZER.BETAS", "[0.8, 0.95]", "TRAIN.WEIGHT_DECAY", "0.1",
                  "TRAIN.LR_REFERENCE_BATCH", "0", "TRAIN.BASE_LR", "0.003")
    optimizer = build_optimizer(cfg, Toy())
    assert [(group["eps"], group["betas"], group["lr"]) for group in optimizer.param_groups] == [
        (1e-6, (0.8, 0.95), 0.003)] * 2
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]


def test_weight_decay_exempts_tagged_parameters_only():
    decay, no_decay = split_weight_decay(Toy(), no_decay_ssm=True)
    assert decay == ["A_log", "fc.weight"]  # model order
    assert set(no_decay) == {"fc.bias", "norm.weight", "norm.bias", "table"}
    with pytest.raises(ConfigError, match="no parameter of Toy carries the _no_weight_decay tag"):
        split_weight_decay(copy.deepcopy(Toy()), no_decay_ssm=True)  # a deep copy drops the tags
    assert sorted(split_weight_decay(Toy(), no_decay_ssm=False)[0]) == ["A_log", "fc.weight", "table"]


class Listed(nn.Module):
    """One parameter per exemption rule other than 1-D: a 2-D ``.bias``, a name from ``no_weight_decay()``, a
    keyword from ``no_weight_decay_keywords()``; a frozen parameter; two matrices that decay."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Module()
        self.mix.weight = nn.Parameter(torch.ones(2, 2))
        self.mix.bias = nn.Parameter(torch.ones(2, 2))
        self.pos_embed = nn.Parameter(torch.ones(1, 3, 3))
        self.rel_table = nn.Parameter(torch.ones(3, 3))
        self.frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)
        self.kernel = nn.Parameter(torch.ones(3, 3))

    def no_weight_decay(self):
        return {"pos_embed"}

    def no_weight_decay_keywords(self):
        return {"table"}


def test_weight_decay_exempts_listed_names_keywords_and_biases_and_skips_frozen_parameters():
    decay, no_decay = split_weight_decay(Listed(), no_decay_ssm=False)
    assert decay == ["kernel", "mix.weight"]  # model order: a module's own parameters before its children's
    assert no_decay == ["pos_embed", "rel_table", "mix.bias"]
    model = Listed()
    optimizer = build_optimizer(_config(), model)
    params = dict(model.named_parameters())
    assert [[id(p) for p in group["params"]] for group in optimizer.param_groups] == [
        [id(params[n]) for n in names] for names in (decay, no_decay)]


def test_a_warm_up_as_long_as_the_run_is_named(caplog):
    with caplog.at_level(logging.WARNING):
        build_scheduler(_config("TRAIN.EPOCHS", "5", "TRAIN.WARMUP_EPOCHS", "4"), build_optimizer(_config(), Toy()), 3)
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        build_scheduler(_config("TRAIN.EPOCHS", "5", "TRAIN.WARMUP_EPOCHS", "5"), build_optimizer(_config(), Toy()), 3)
    assert "TRAIN.WARMUP_EPOCHS 5 is not below TRAIN.EPOCHS 5: the warm-up never reaches TRAIN.BASE_LR" in caplog.text


def test_schedule_is_linear_warmup_then_cosine_per_update():
    cfg = _config("TRAIN.EPOCHS", "10", "TRAIN.WARMUP_EPOCHS", "2", "TRAIN.LR_REFERENCE_BATCH", "0",
                  "TRAIN.BASE_LR", "1e-3", "TRAIN.WARMUP_LR", "1e-6", "TRAIN.MIN_LR", "1e-5")
    optimizer = build_optimizer(cfg, Toy())
    updates_per_epoch = 5
    scheduler = build_scheduler(cfg, optimizer, updates_per_epoch)
    warmup, total = 2 * updates_per_epoch, 10 * updates_per_epoch
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)
    for update in (1, 4, 10, 11, 30, 49, 50):
        scheduler.step_update(update)
        if update < warmup:
            expected = 1e-6 + (1e-3 - 1e-6) * update / warmup
        else:
            expected = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (update - warmup) / (total - warmup)))
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected] * 2, rel=1e-9), update


def _batches(n_batches: int, batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 6, generator=generator), torch.randint(0, 3, (batch,), generator=generator), 0)
            for _ in range(n_batches)]


# A constant learning rate of 0.1 (TRAIN.BASE_LR = TRAIN.MIN_LR, no warmup).
CONSTANT_LR_OPTS = ("TRAIN.LR_REFERENCE_BATCH", "0", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.EPOCHS", "1",
                    "TRAIN.BASE_LR", "0.1", "TRAIN.MIN_LR", "0.1")


def _train(model, batches, accumulation_steps=1, clip_grad=5.0, **kwargs):
    cfg = _config(*CONSTANT_LR_OPTS)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, math.ceil(len(batches) / accumulation_steps))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return train_one_epoch(model, nn.CrossEntropyLoss(), batches, optimizer, scheduler, scaler, torch.device("cpu"),
                           0, 1, accumulation_steps=accumulation_steps, clip_grad=clip_grad, print_freq=100, **kwargs)


def test_a_last_partial_accumulation_group_is_an_update_of_its_own():
    """3 batches with accumulation 2: update 1 from batches 0 and 1, update 2 from batch 2 alone (its loss divided by
    2 all the same), each clipped to norm 5 (hand-run AdamW as the reference)."""
    torch.manual_seed(0)
    model = Toy()
    reference = copy.deepcopy(model)
    batches = _batches(3, 2)
    updates = []
    _train(model, batches, accumulation_steps=2, step_hook=lambda epoch, steps, update: updates.append(update))
    assert updates == [1, 2]
    optimizer = build_optimizer(_config(*CONSTANT_LR_OPTS), reference)
    for group in ([0, 1], [2]):
        for index in group:
            images, targets, _ = batches[index]
            (nn.functional.cross_entropy(reference(images), targets) / 2).backward()
        nn.utils.clip_grad_norm_(reference.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad()
    for (name, expected), actual in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7, msg=name)


def test_update_numbers_continue_across_epochs_with_a_partial_group():
    """The schedule's update count: ceil(3 / 2) = 2 updates per epoch, so epoch 1 makes updates 3 and 4."""
    torch.manual_seed(0)
    model = Toy()
    cfg = _config(*CONSTANT_LR_OPTS)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, 2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    updates = []
    for epoch in range(2):
        train_one_epoch(model, nn.CrossEntropyLoss(), _batches(3, 2, seed=epoch), optimizer, scheduler, scaler,
                        torch.device("cpu"), epoch, 2, accumulation_steps=2, print_freq=100,
                        step_hook=lambda epoch, steps, update: updates.append((epoch, steps, update)))
    assert updates == [(0, 2, 1), (0, 3, 2), (1, 2, 3), (1, 3, 4)]


def test_the_epochs_last_step_is_logged_whatever_the_print_frequency(caplog):
    with caplog.at_level(logging.INFO, logger="classification.engine"):
        _train(Toy(), _batches(3, 2))  # print_freq 100
    assert [line.split(" eta ")[0] for line in caplog.messages if line.startswith("Train ")] == ["Train [0/1][3/3]"]


def test_clip_grad_zero_means_no_clipping():
    torch.manual_seed(0)
    unclipped = Toy()
    huge_bound = copy.deepcopy(unclipped)
    batches = _batches(2, 4)
    stats = _train(unclipped, batches, clip_grad=0.0)
    expected = _train(huge_bound, batches, clip_grad=1e9)
    assert stats["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-9) and stats["grad_norm"] > 0
    for (name, a), b in zip(unclipped.named_parameters(), huge_bound.parameters()):
        assert torch.equal(a, b), name


def test_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    reference = Toy()
    accumulated = copy.deepcopy(reference)
    small = _batches(4, 2)
    big = [(torch.cat([small[i][0], small[i + 1][0]]), torch.cat([small[i][1], small[i + 1][1]]), 0)
           for i in (0, 2)]
    _train(reference, big)
    _train(accumulated, small, accumulation_steps=2)
    for (name, a), b in zip(reference.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_mesa_adds_soft_target_ce_from_the_ema_teacher():
    torch.manual_seed(0)
    model = Toy()
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        ema.module.fc.weight.normal_()  # a teacher that differs from the student
    images, targets, _ = _batches(1, 4)[0]
    expected_ce = nn.functional.cross_entropy(model(images), targets).item()
    teacher = torch.softmax(ema.module(images), -1)
    expected_mesa = (-teacher * torch.log_softmax(model(images), -1)).sum(-1).mean().item()
    stats = _train(model, [(images, targets, 0)], model_ema=ema, mesa_weight=1.5)
    assert stats["loss"] == pytest.approx(expected_ce + 1.5 * expected_mesa, rel=1e-6)
    with pytest.raises(ValueError, match="EMA"):
        _train(Toy(), _batches(1, 4), mesa_weight=1.0)


def test_the_ema_blends_at_its_decay_from_the_first_update():
    """As the releases' timm ModelEma: ema = decay * ema + (1 - decay) * weights after every update, the first one
    included (ModelEmaV3 given a step count would copy the weights at the first)."""
    torch.manual_seed(0)
    model = Toy()
    ema = ModelEmaV3(model, decay=0.75)
    expected = model.fc.weight.detach().clone()
    for batch in _batches(2, 4):  # one update per call, the EMA's right after it
        _train(model, [batch], model_ema=ema)
        expected = 0.75 * expected + 0.25 * model.fc.weight.detach()
    torch.testing.assert_close(ema.module.fc.weight, expected, rtol=1e-6, atol=1e-7)


def test_nan_loss_stops_before_any_update():
    model = Toy()
    before = copy.deepcopy(model.state_dict())
    batches = _batches(3, 2)
    batches[1] = (torch.full_like(batches[1][0], float("nan")), batches[1][1], 0)
    with pytest.raises(NonFiniteLossError, match="epoch 0 step 1"):
        _train(model, batches, accumulation_steps=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # step 0 was never applied


def test_a_stop_request_ends_the_epoch_after_the_next_update_but_not_at_its_end():
    """Asked to stop during step 0 with accumulation 2, the run completes the update of steps 0-1 (a mid-epoch
    checkpoint can only sit between updates), calls the step hook, then stops; asked at the epoch's last update it
    finishes the epoch (the caller evaluates and saves it whole)."""
    requests = iter([True])  # the first step's question only: a SIGTERM that arrived before it

    hooked = []
    with pytest.raises(TrainingStopped) as stopped:
        _train(Toy(), _batches(6, 2), accumulation_steps=2, stop_requested=lambda: next(requests, False),
               step_hook=lambda epoch, steps, update: hooked.append((steps, update)))
    assert (stopped.value.epoch, stopped.value.steps_done, stopped.value.num_updates) == (0, 2, 1)
    assert hooked == [(2, 1)]
    asked = iter([False, False, True])  # during the last step (the second update, a partial group)
    stats = _train(Toy(), _batches(3, 2), accumulation_steps=2, stop_requested=lambda: next(asked))
    assert math.isfinite(stats["loss"])


def test_evaluate_top1_top5_match_hand_count():
    classes = 7
    logits = torch.randn(10, classes, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, classes, (10,), generator=torch.Generator().manual_seed(2))

    class Lookup(nn.Module):
        def forward(self, index):
            return logits[index.long()]

    # The last batch's images were all unreadable (left out, counted as skipped).
    loader = [(torch.arange(0, 6), targets[:6], 0), (torch.arange(6, 10), targets[6:], 1), (None, None, 2)]
    metrics = evaluate(Lookup(), loader, torch.device("cpu"))
    ranks = (logits > logits.gather(1, targets[:, None])).sum(1)  # how many classes beat the target
    assert metrics["acc1"] == pytest.approx(100.0 * (ranks < 1).float().mean().item())
    assert metrics["acc5"] == pytest.approx(100.0 * (ranks < 5).float().mean().item())
    assert metrics["loss"] == pytest.approx(nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)
    assert metrics["count"] == 10 and metrics["skipped_images"] == 3


def test_top5_counts_a_target_ranked_exactly_fifth():
    classes = 7
    logits = torch.arange(classes, 0, -1, dtype=torch.float32).repeat(classes, 1)  # class c ranked c-th (0-based)
    targets = torch.arange(classes)  # one image per rank 0..6

    class Lookup(nn.Module):
        def forward(self, index):
            return logits[index.long()]

    metrics = evaluate(Lookup(), [(torch.arange(classes), targets, 0)], torch.device("cpu"))
    assert metrics["acc1"] == pytest.approx(100.0 / 7)
    assert metrics["acc5"] == pytest.approx(100.0 * 5 / 7)


def test_throughput_reports_rate_and_device():
    result = throughput(nn.Conv2d(3, 4, 3), batch_size=2, img_size=8, in_chans=3, device=torch.device("cpu"),
                        amp_dtype=None, iters=2, warmup_iters=1)
    assert result["images_per_sec"] > 0 and result["device"].startswith("cpu")


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_steps_update_the_weights(amp_dtype):
    torch.manual_seed(0)
    model = Toy()
    before = model.fc.weight.detach().clone()
    cfg = _config("TRAIN.LR_REFERENCE_BATCH", "0", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.EPOCHS", "1")
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, 2)
    scaler = torch.amp.GradScaler("cpu", enabled=amp_dtype == torch.float16)
    stats = train_one_epoch(model, nn.CrossEntropyLoss(), _batches(2, 4), optimizer, scheduler, scaler,
                            torch.device("cpu"), 0, 1, amp_dtype=amp_dtype, print_freq=100)
    assert math.isfinite(stats["loss"]) and not torch.equal(model.fc.weight, before)
    assert model.fc.weight.dtype == torch.float32  # autocast leaves the master weights in float32


def test_fp16_gradients_are_unscaled_before_they_are_measured_and_clipped():
    """With the grad scaler on (scale 2^16), the logged norm and the clipped update are those of the true gradients."""
    torch.manual_seed(0)
    half = Toy()
    full = copy.deepcopy(half)
    batches = _batches(1, 8)
    cfg = _config(*CONSTANT_LR_OPTS)
    results = []
    for model, amp_dtype in ((half, torch.float16), (full, None)):
        optimizer = build_optimizer(cfg, model)
        scheduler = build_scheduler(cfg, optimizer, 1)
        scaler = torch.amp.GradScaler("cpu", enabled=amp_dtype is not None)
        results.append(train_one_epoch(model, nn.CrossEntropyLoss(), batches, optimizer, scheduler, scaler,
                                       torch.device("cpu"), 0, 1, clip_grad=0.5, amp_dtype=amp_dtype, print_freq=100))
    assert results[0]["grad_norm"] == pytest.approx(results[1]["grad_norm"], rel=1e-2)
    torch.testing.assert_close(half.fc.weight, full.fc.weight, rtol=1e-2, atol=1e-3)


def test_only_fp16_autocast_on_the_cpu_is_warned_about_as_slow(caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level(logging.WARNING):
        for device, amp_dtype in ((cpu, None), (cpu, torch.bfloat16), (cuda, torch.float16), (cuda, torch.bfloat16)):
            warn_if_slow_autocast(device, amp_dtype)
        assert not caplog.records
        warn_if_slow_autocast(cpu, torch.float16)
    assert "AMP fp16 on the CPU: autocast to float16 runs slowly" in caplog.text
