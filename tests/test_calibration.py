"""privacy.noise_multiplier=null: σ calibrated so that a site training every round spends its whole ε."""

from __future__ import annotations

import pytest

from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.federation.scheduling import round_config
from fedtune.privacy.accounting import Charge, epsilon
from fedtune.privacy.calibration import noise_multiplier
from fedtune.tasks import training_settings
from fedtune.validation import validate

FINGERPRINT = "0" * 64


def _schedule(cfg: FedtuneConfig, sigma: float) -> float:
    p = cfg.privacy
    history = [Charge(r, sigma, p.sample_rate, cfg.train.local_steps) for r in range(1, cfg.federation.num_rounds + 1)]
    return epsilon(history, p.delta, p.accountant)


@pytest.mark.parametrize("target,rounds,steps,q", [(8.0, 5, 15, 0.05), (2.0, 10, 3, 0.2), (0.5, 3, 10, 0.01)])
def test_the_calibrated_sigma_spends_the_whole_budget_and_no_more(target, rounds, steps, q) -> None:
    cfg = FedtuneConfig()
    cfg.privacy.target_epsilon, cfg.privacy.sample_rate = target, q
    cfg.federation.num_rounds, cfg.train.local_steps = rounds, steps
    assert cfg.privacy.noise_multiplier is None
    sigma = noise_multiplier(cfg)
    spent = _schedule(cfg, sigma)
    assert target - 0.05 <= spent <= target
    # And the server's round config carries exactly it, so sites are charged what was planned.
    assert round_config(cfg, 1, FINGERPRINT).noise_multiplier == sigma
    assert _schedule(cfg, sigma * 0.97) > target  # not needlessly noisy


def test_a_given_sigma_and_a_non_private_run_are_taken_as_they_are() -> None:
    cfg = FedtuneConfig()
    cfg.privacy.noise_multiplier = 1.3
    assert noise_multiplier(cfg) == 1.3
    cfg.privacy.enabled, cfg.privacy.noise_multiplier = False, None
    assert noise_multiplier(cfg) == 0.0 and round_config(cfg, 1, FINGERPRINT).noise_multiplier == 0.0


def test_a_budget_no_sigma_can_meet_is_refused_before_the_run() -> None:
    cfg = FedtuneConfig()
    cfg.privacy.target_epsilon, cfg.privacy.sample_rate = 0.01, 1.0
    cfg.federation.num_rounds, cfg.train.local_steps = 100, 1000
    with pytest.raises(ConfigError, match="privacy.noise_multiplier") as caught:
        validate(cfg)
    assert "target_epsilon" in str(caught.value)


def test_training_settings_fall_back_to_the_tasks_defaults() -> None:
    cfg = FedtuneConfig()
    lm = training_settings(cfg)
    assert (lm.optimizer, lm.learning_rate, lm.head_learning_rate) == ("adam", 0.01, 0.01)
    cfg.model.task = "classification"
    classify = training_settings(cfg)
    assert (classify.optimizer, classify.learning_rate, classify.head_learning_rate) == ("sgd", 0.05, 1.0)
    cfg.train.optimizer, cfg.train.learning_rate = "adam", 0.002
    assert training_settings(cfg).learning_rate == 0.002 and training_settings(cfg).head_learning_rate == 1.0
    cfg.train.head_learning_rate = 0.5
    rc = round_config(cfg, 1, FINGERPRINT)
    assert (rc.optimizer, rc.learning_rate, rc.head_learning_rate) == ("adam", 0.002, 0.5)


@pytest.mark.parametrize("field_name,value", [("learning_rate", 0.0), ("head_learning_rate", -1.0),
                                              ("head_learning_rate", float("nan")), ("optimizer", "lbfgs")])
def test_bad_training_settings_are_refused_by_name(field_name, value) -> None:
    cfg = FedtuneConfig()
    setattr(cfg.train, field_name, value)
    with pytest.raises(ConfigError, match=f"train.{field_name}"):
        validate(cfg)
