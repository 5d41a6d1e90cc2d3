"""TemperatureScheduler: schedule values per mode, argument checks, and what a real fit sees and logs."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning import ClassifierModule, DistillationModule
from kd_lightning.callbacks import ScalarScheduler, TemperatureScheduler


def _loader(rows: int = 64, batch_size: int = 16) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(rows, 1, 8, 8, generator=gen), torch.randint(0, 10, (rows,), generator=gen))
    return DataLoader(data, batch_size=batch_size)


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", max_epochs=3, limit_train_batches=4, limit_val_batches=0, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=tmp_path)
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


@pytest.mark.parametrize(("kwargs", "expected"), [
    (dict(schedule="constant", start=3.0), {0: 3.0, 7: 3.0, 1000: 3.0}),
    # "start at T=4, lower by 0.2 every 10 epochs", floor 1
    (dict(schedule="step", start=4.0, delta=-0.2, every=10, min_value=1.0),
     {0: 4.0, 9: 4.0, 10: 3.8, 25: 3.6, 149: 1.2, 150: 1.0, 1000: 1.0}),
    (dict(schedule="step", start=4.0, gamma=0.5, every=2), {0: 4.0, 1: 4.0, 2: 2.0, 5: 1.0}),
    # T = max(2, 4 - 0.02 epoch)
    (dict(schedule="linear", start=4.0, delta=-0.02, min_value=2.0), {0: 4.0, 50: 3.0, 100: 2.0, 150: 2.0}),
    # DKD's warm-up of a loss weight: 0 -> 0.9 over 20 epochs, then held
    (dict(schedule="linear", start=0.0, end=0.9, duration=20, attribute="terms.kd.weight"),
     {0: 0.0, 10: 0.45, 20: 0.9, 30: 0.9}),
    (dict(schedule="exponential", start=4.0, gamma=0.9, min_value=3.0), {0: 4.0, 1: 3.6, 2: 3.24, 3: 3.0}),
    (dict(schedule="exponential", start=8.0, end=2.0, duration=2), {0: 8.0, 1: 4.0, 2: 2.0, 9: 2.0}),
    (dict(schedule="cosine", start=4.0, end=1.0, duration=10), {0: 4.0, 5: 2.5, 10: 1.0, 12: 1.0}),
    (dict(schedule="linear", start=1.0, delta=0.5, max_value=2.0), {0: 1.0, 1: 1.5, 2: 2.0, 3: 2.0}),
])
def test_schedule_values(kwargs, expected):
    scheduler = TemperatureScheduler(**kwargs)
    assert {t: scheduler.value_at(t) for t in expected} == pytest.approx(expected)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(schedule="warm"), "Unknown schedule"),
    (dict(schedule="step", start=4.0), "exactly one of delta, gamma"),
    (dict(schedule="step", delta=-0.1, gamma=0.5), "exactly one of delta, gamma"),
    (dict(schedule="constant", end=1.0), "does not use end"),
    (dict(schedule="cosine", delta=-0.1), "does not use delta"),
    (dict(schedule="linear", delta=-0.1, every=10), "every is used by the 'step' schedule only"),
    (dict(schedule="step", delta=-0.1, every=0), "every must be a positive int"),
    (dict(schedule="exponential", gamma=0.0), "gamma must be > 0"),
    (dict(schedule="linear", delta=-0.1, duration=10), "duration applies"),
    (dict(schedule="cosine", end=1.0, interval="batch"), "interval must be"),
    (dict(schedule="linear", delta=-0.1, min_value=0.0), "temperature must stay > 0"),
    (dict(schedule="linear", delta=0.1, min_value=-0.5, attribute="terms.kd.weight"), "weight must stay >= 0"),
    (dict(schedule="linear", delta=-0.1, min_value=3.0, max_value=2.0), "above max_value"),
    (dict(schedule="constant", attribute="a..b"), "attribute must be"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TemperatureScheduler(**kwargs)


class _Seen(Callback):
    """Records the temperature and the soft term's weight each training batch runs with."""

    def __init__(self) -> None:
        self.temperature: list[float] = []
        self.weight: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.temperature.append(pl_module.temperature)
        self.weight.append(pl_module.terms["kd"].weight)


def test_fit_schedules_temperature_per_epoch_and_a_weight_per_step(tmp_path):
    """Start from the module's own T=5, cosine to 1 over the 3-epoch run; the soft term's weight warms up per
    step; both are seen by the training steps and logged (train/temperature by the module, the weight by the
    callback)."""
    model = DistillationModule(student="mlp", teacher="mlp", num_classes=10, temperature=5.0, alpha=0.9,
                               optim=dict(lr_scheduler="none"))
    seen = _Seen()
    callbacks = [TemperatureScheduler("cosine", end=1.0),
                 ScalarScheduler("linear", start=0.0, end=0.5, duration=5, interval="step",
                                 attribute="terms.kd.weight"),
                 seen]
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    trainer = _trainer(tmp_path, callbacks, logger=logger, log_every_n_steps=1)
    trainer.fit(model, _loader())

    assert seen.temperature == pytest.approx([5.0] * 4 + [3.0] * 4 + [1.0] * 4)
    assert seen.weight == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4] + [0.5] * 7)
    assert model.temperature == 1.0 and callbacks[0].value == 1.0

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    logged_t = [e.value for e in events.Scalars("train/temperature")]
    logged_weight = [e.value for e in events.Scalars("train/terms.kd.weight")]
    assert logged_t == pytest.approx(seen.temperature)
    assert logged_weight == pytest.approx(seen.weight)


def test_temperature_moves_every_term_or_asks_which(tmp_path):
    """"temperature" names every term that has one: with terms at different temperatures it moves them all from a
    given start, and without a start it says which names to use instead (no silent "first term")."""
    from kd_lightning.distillers import DKD, CrossEntropy, HintonKD

    def model():
        return DistillationModule(student="mlp", teacher="mlp", num_classes=10, optim=dict(lr_scheduler="none"),
                                  terms={"ce": CrossEntropy(), "kd": HintonKD(0.5, temperature=4.0),
                                         "dkd": DKD(0.5, temperature=2.0, warmup=0)})

    with pytest.raises(ValueError, match=r"different ones \{'kd': 4.0, 'dkd': 2.0\}.*terms.kd.temperature"):
        _trainer(tmp_path, [TemperatureScheduler("cosine", end=1.0)]).fit(model(), _loader())
    both = model()
    seen = _Seen()
    _trainer(tmp_path, [TemperatureScheduler("linear", start=3.0, end=1.0), seen]).fit(both, _loader())
    assert both.temperatures() == {"kd": 1.0, "dkd": 1.0} and seen.temperature[0] == 3.0
    with pytest.raises(ValueError, match="no attribute 'alpha'.*schedule terms.kd.weight"):
        _trainer(tmp_path, [ScalarScheduler("constant", start=0.5, attribute="alpha")]).fit(model(), _loader())


def test_two_schedulers_keep_separate_state():
    assert TemperatureScheduler().state_key != TemperatureScheduler(attribute="terms.kd.weight").state_key


def test_missing_attribute_is_a_clear_error(tmp_path):
    model = ClassifierModule(model="mlp", num_classes=10, optim=dict(lr_scheduler="none"))
    with pytest.raises(ValueError, match="ClassifierModule has no attribute 'temperature'.*float attributes"):
        _trainer(tmp_path, [TemperatureScheduler("constant", start=2.0)]).fit(model, _loader())


def test_schedule_below_zero_temperature_is_a_clear_error(tmp_path):
    model = DistillationModule(student="mlp", teacher="mlp", num_classes=10, temperature=1.0, optim=dict(lr_scheduler="none"))
    with pytest.raises(ValueError, match="temperature must stay > 0.*epoch 2"):
        _trainer(tmp_path, [TemperatureScheduler("linear", delta=-0.5)]).fit(model, _loader())


def test_whole_run_schedule_needs_a_length(tmp_path):
    model = DistillationModule(student="mlp", teacher="mlp", num_classes=10, optim=dict(lr_scheduler="none"))
    trainer = _trainer(tmp_path, [TemperatureScheduler("cosine", start=4.0, end=1.0)], max_epochs=-1, max_steps=4)
    with pytest.raises(ValueError, match="max_epochs is not set"):
        trainer.fit(model, _loader())
