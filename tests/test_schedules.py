"""The LR schedules (`mtp_occ.schedules.LR_SCHEDULES`): one pure function per `LrSchedule` name, the same
one for the RL engine and for pre-training, and the numbers they have always produced."""

import math

import pytest
import torch

from mtp_occ.config import AlgoConfig, DeepSpeedConfig, LrSchedule
from mtp_occ.engine import TorchEngine, build_engine
from mtp_occ.schedules import LR_SCHEDULES, build_lr_schedule, lr_constant, lr_cosine


def _reference(step: int, warmup: int, total: int, cosine: bool, clamp: bool = True) -> float:
    """The formula the engine and pre-training each spelled out before the registry, operation for operation."""
    if step < warmup:
        return (step + 1) / warmup
    if cosine:
        p = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (min(p, 1.0) if clamp else p)))
    return 1.0


def test_every_lr_schedule_name_has_one_function():
    assert set(LR_SCHEDULES) == {s.value for s in LrSchedule}
    assert LR_SCHEDULES["constant"] is lr_constant and LR_SCHEDULES["cosine"] is lr_cosine
    with pytest.raises(ValueError):
        build_lr_schedule("linear", 0, 10)


@pytest.mark.parametrize("name", ["constant", "cosine"])
def test_warmup_ramps_linearly_to_the_peak(name):
    f = build_lr_schedule(name, 4, 20)
    assert [f(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_constant_stays_at_one_and_cosine_ends_at_a_tenth():
    const, cos = build_lr_schedule(LrSchedule.constant, 0, 10), build_lr_schedule(LrSchedule.cosine, 2, 12)
    assert all(const(s) == 1.0 for s in range(20))
    assert cos(2) == 1.0 and cos(7) == pytest.approx(0.55) and cos(12) == pytest.approx(0.1)
    assert cos(30) == cos(12)  # past the horizon (a resumed run given more steps) it stays at 0.1
    assert all(cos(s) >= cos(s + 1) for s in range(2, 30))


@pytest.mark.parametrize(("warmup", "total"), [(0, 1), (0, 7), (3, 10), (5, 5), (9, 4), (50, 500)])
def test_the_registry_is_bit_identical_to_the_old_formulas(warmup, total):
    for step in range(total + 3):
        assert build_lr_schedule("constant", warmup, total)(step) == _reference(step, warmup, total, False)
        assert build_lr_schedule("cosine", warmup, total)(step) == _reference(step, warmup, total, True)


@pytest.mark.parametrize(("warmup", "total"), [(0, 0), (0, 1), (0, 7), (3, 10), (5, 5), (9, 4), (50, 500)])
def test_pretraining_never_reaches_past_the_cosine_so_the_clamp_changes_nothing(warmup, total):
    """Pre-training's own cosine had no min(p, 1). LambdaLR evaluates steps 0..total (one per `step()` after
    construction) and on all of them p <= 1, so the shared, clamped function gives the same numbers."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    seen: list[int] = []
    f = build_lr_schedule(LrSchedule.cosine, warmup, total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: seen.append(s) or f(s))
    for _ in range(total):
        opt.step()
        sched.step()
    assert seen == list(range(total + 1))
    for s in seen:
        assert f(s) == _reference(s, warmup, total, True, clamp=False)


@pytest.fixture
def lr_schedule_calls(monkeypatch) -> list[tuple[LrSchedule, int, int]]:
    """Every `build_lr_schedule` call, in the engine (imported by name) and in pre-training (imported
    from `mtp_occ.schedules` when it runs)."""
    import mtp_occ.engine
    import mtp_occ.schedules

    calls, real = [], mtp_occ.schedules.build_lr_schedule

    def spy(name, warmup_steps, total_steps):
        calls.append((LrSchedule(name), warmup_steps, total_steps))
        return real(name, warmup_steps, total_steps)

    monkeypatch.setattr(mtp_occ.engine, "build_lr_schedule", spy)
    monkeypatch.setattr(mtp_occ.schedules, "build_lr_schedule", spy)
    return calls


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no update runs
def test_the_engine_follows_its_schedule_over_the_run(lr_schedule_calls):
    algo = AlgoConfig(lr=1.0, lr_schedule=LrSchedule.cosine, lr_warmup_steps=2)
    engine = build_engine(torch.nn.Linear(2, 2), algo, DeepSpeedConfig(), total_steps=12, world=1)
    assert isinstance(engine, TorchEngine) and lr_schedule_calls == [(LrSchedule.cosine, 2, 12)]
    lrs = [engine.lr()]
    for _ in range(12):
        engine.scheduler_step()
        lrs.append(engine.lr())
    assert lrs == [lr_cosine(s, 2, 12) for s in range(13)]
    assert engine.state_dict()["lr_sched"]["lr_lambdas"] == [None]  # a closure: checkpoints hold no schedule


def test_pretraining_uses_the_same_cosine(lr_schedule_calls, tmp_path):
    from mtp_occ.config import compose
    from mtp_occ.tasks.pretrain import pretrain

    cfg = compose(["data.n_terms=2", "data.min_operand=1", "data.max_operand=9", "data.heldout_size=8",
                   "model.pretrain.steps=3", "model.pretrain.batch_size=2", "model.pretrain.warmup_steps=1",
                   "wandb.mode=disabled"])
    pretrain(cfg.model, cfg.data, 0, tmp_path)
    assert lr_schedule_calls == [(LrSchedule.cosine, 1, 3)]
