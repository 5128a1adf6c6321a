"""The strategy table of the outer step: which strategy a run configuration gives each
configuration of pi(C)."""

import pytest

from resalign_fast.config import ResAlignConfig
from resalign_fast.inner.configs import FTConfig
from resalign_fast.strategies import STRATEGIES, inplace_simulation, strategy_for

FULL, LORA = FTConfig(algorithm="full"), FTConfig(algorithm="lora")


@pytest.mark.parametrize(
    "settings,config,expected",
    [
        (dict(lam=0.0), FULL, "plain"),
        (dict(lam=0.0, hypergrad="unrolled"), LORA, "plain"),
        (dict(hypergrad="unrolled"), FULL, "unrolled"),
        (dict(hypergrad="first_order", lean_full=True, hvp="fd"), FULL, "first_order"),
        (dict(hypergrad="first_order"), LORA, "first_order"),
        (dict(lean_full=True, hvp="fd"), FULL, "implicit_inplace"),
        (dict(lean_full=True, hvp="fd"), LORA, "implicit"),
        (dict(), FULL, "implicit"),
    ],
)
def test_strategy_for(settings, config, expected):
    cfg = ResAlignConfig(**settings)
    assert strategy_for(cfg, config) == expected
    assert expected in STRATEGIES


def test_inplace_simulation_only_for_full_configs_under_lean_full():
    lean = ResAlignConfig(lean_full=True, hvp="fd")
    assert inplace_simulation(lean, FULL) and not inplace_simulation(lean, LORA)
    assert not inplace_simulation(ResAlignConfig(), FULL)


def test_every_strategy_is_reachable():
    cases = [
        (ResAlignConfig(lam=0.0), FULL),
        (ResAlignConfig(hypergrad="unrolled"), FULL),
        (ResAlignConfig(hypergrad="first_order"), FULL),
        (ResAlignConfig(lean_full=True, hvp="fd"), FULL),
        (ResAlignConfig(), FULL),
    ]
    assert {strategy_for(cfg, c) for cfg, c in cases} == set(STRATEGIES)
