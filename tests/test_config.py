import pytest

from resalign_fast.cli import parse_config
from resalign_fast.config import ConfigError, ResAlignConfig, from_dict, to_toml
from resalign_fast.inner.configs import FTConfig, load_ft_space


def test_defaults_are_the_reference_recipe():
    c = ResAlignConfig()
    assert (
        c.lam,
        c.iters,
        c.gamma,
        c.alpha,
        c.max_grad_norm,
        c.max_retries,
        c.configs_per_step,
    ) == (0.8, 5, 1.0, 1.0, 0.2, 5, 3)
    assert (c.weight_decay, c.w_r_start, c.w_r_end, c.lora_rank, c.lora_alpha) == (
        1e-2,
        1.6,
        2.0,
        4,
        4.0,
    )
    assert (
        "digits" in ResAlignConfig.__dataclass_fields__["lr"].metadata["help"]
    )  # the one scaled value, documented


def test_precedence_file_then_flags(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('lam = 0.5\nsolver = "cg"\nouter_steps = 7\n')
    c = parse_config(["--config", str(f), "--outer_steps", "3", "--no-progress"])
    assert (c.lam, c.solver, c.outer_steps, c.progress) == (0.5, "cg", 3, False)


def test_round_trip_through_toml(tmp_path):
    c = from_dict({"lam": 0.3, "hvp": "fd", "proximal": True})
    f = tmp_path / "c.toml"
    f.write_text(to_toml(c))
    assert parse_config(["--config", str(f)]) == c


@pytest.mark.parametrize(
    "d, key",
    [
        ({"lamda": 1}, "lamda"),
        ({"lam": 1.5}, "lam"),
        ({"solver": "lu"}, "solver"),
        ({"outer_steps": 0}, "outer_steps"),
        ({"iters": 2.5}, "iters"),
        ({"proximal": "maybe"}, "proximal"),
        ({"hvp": "jvp", "gradient_checkpointing": True}, "checkpointing"),
        ({"lean_full": True}, "lean_full: needs hvp 'fd'"),
        ({"lean_full": True, "hvp": "fd", "proximal": True}, "proximal"),
        ({"lean_full": True, "hvp": "fd", "hypergrad": "unrolled"}, "unrolled"),
    ],
)
def test_bad_values_name_the_key(d, key):
    with pytest.raises(ConfigError, match=key):
        from_dict(d)


def test_lean_full_combinations():
    assert from_dict({"lean_full": True, "hvp": "fd"}).lean_full
    assert from_dict({"lean_full": True, "hypergrad": "first_order"}).lean_full  # no HVPs at all


def test_bad_flag_exits_nonzero():
    with pytest.raises(SystemExit) as e:
        parse_config(["--solver", "lu"])
    assert e.value.code != 0


def test_missing_and_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        parse_config(["--config", str(tmp_path / "nope.toml")])
    bad = tmp_path / "bad.toml"
    bad.write_text("lam = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config(["--config", str(bad)])


def test_ft_space_shipped_files_span_pi_c():
    sp = load_ft_space("reference")
    assert len(sp.configs) == 3 * 4 * 2 * 2 * 2
    assert {c.lr for c in sp.configs} == {1e-4, 1e-5, 1e-6} and {c.steps for c in sp.configs} == {
        5,
        10,
        20,
        30,
    }
    assert {(c.loss, c.algorithm, c.optimizer) for c in sp.configs} == {
        (loss, a, o)
        for loss in ("standard", "dreambooth")
        for a in ("full", "lora")
        for o in ("sgd", "adam")
    }
    assert len(load_ft_space("digits").configs) == 96


def test_ft_space_explicit_list_and_errors(tmp_path):
    p = tmp_path / "l.toml"
    p.write_text(
        "[fixed]\nbatch_size = 2\n[[configs]]\nlr = 1e-3\nsteps = 4\n[[configs]]\nlr = 1e-4\nsteps "
        '= 2\noptimizer = "sgd"\n'
    )
    sp = load_ft_space(str(p))
    assert sp.configs == (
        FTConfig(lr=1e-3, steps=4, batch_size=2),
        FTConfig(lr=1e-4, steps=2, batch_size=2, optimizer="sgd"),
    )
    p.write_text("[[configs]]\nlr = 1e-3\nstep = 4\n")
    with pytest.raises(ConfigError, match="step"):
        load_ft_space(str(p))
    p.write_text('[space]\nlr = [1e-3]\noptimizer = ["lbfgs"]\n')
    with pytest.raises(ConfigError, match="optimizer"):
        load_ft_space(str(p))
    with pytest.raises(ConfigError, match="unknown name"):
        load_ft_space("nonexistent")


def test_sampling_is_seeded_and_uniform():
    import torch

    sp = load_ft_space("digits")
    a = sp.sample(3, torch.Generator().manual_seed(5))
    assert a == sp.sample(3, torch.Generator().manual_seed(5))
    draws = sp.sample(4000, torch.Generator().manual_seed(0))
    frac_lora = sum(c.algorithm == "lora" for c in draws) / len(draws)
    assert abs(frac_lora - 0.5) < 0.04


def test_package_exports_its_public_api():
    import resalign_fast
    from resalign_fast import ResAlignConfig, implicit_hypergrad, richardson_solve
    from resalign_fast.config import ResAlignConfig as C
    from resalign_fast.hypergrad import implicit_hypergrad as ih
    from resalign_fast.hypergrad import richardson_solve as rs

    assert (ResAlignConfig, implicit_hypergrad, richardson_solve) == (C, ih, rs)
    assert sorted(resalign_fast.__all__) == [
        "ResAlignConfig",
        "implicit_hypergrad",
        "richardson_solve",
    ]
    assert set(resalign_fast.__all__) <= set(dir(resalign_fast))
    with pytest.raises(AttributeError):
        resalign_fast.nothing_here  # noqa: B018 - the attribute access is the test
