"""Downstream fine-tuning on the tiny digits-format model: updates as configured, LoRA,
DreamBooth, CLI."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from resalign_fast.config import ConfigError, from_dict
from resalign_fast.data.encoded import encode_set
from resalign_fast.eval.downstream import (
    FinetuneConfig,
    FinetuneError,
    load_prompt_images,
    make_batch,
)
from resalign_fast.eval.ft_run import finetune, save_finetuned
from resalign_fast.models.pipeline import load_model


@pytest.fixture()
def model(tiny_model_dir):
    m = load_model(tiny_model_dir)
    m.unet.eval().requires_grad_(False)
    return m


def _cfg(**kw):
    return from_dict(dict(dict(train_batch_size=2, save_model=False), **kw), cls=FinetuneConfig)


def _first_grad(model, cfg):
    """The gradient of the first training step, recomputed from the same batch on a copy."""
    train = encode_set(
        model,
        load_prompt_images(cfg.train_data, model, cfg.concept, cfg.data_seed),
        torch.device("cpu"),
    )
    b = make_batch(
        train, None, cfg.train_batch_size, model.scheduler, torch.Generator().manual_seed(cfg.seed)
    )
    u = copy.deepcopy(model.unet).requires_grad_(True)
    F.mse_loss(u(b.x_t, b.t, b.emb).sample, b.target).backward()
    return {n: p.grad.clone() for n, p in u.named_parameters()}


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_first_step_closed_form(model, opt):
    lr, wd = 1e-2, 0.05
    cfg = _cfg(
        optimizer=opt,
        learning_rate=lr,
        weight_decay=wd if opt != "sgd" else 0.0,
        max_grad_norm=0.0,
        max_train_steps=1,
        seed=3,
    )
    w0 = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    grads = _first_grad(model, cfg)
    res = finetune(cfg, model, unet=copy.deepcopy(model.unet))
    for n, p in res.unet.named_parameters():
        g, w = grads[n].double(), w0[n].double()
        if opt == "sgd":
            want = w - lr * g
        elif opt == "adam":  # L2 into the gradient; bias-corrected m/sqrt(v) = g/|g| on step 1
            gg = g + wd * w
            want = w - lr * gg / (gg.abs() + 1e-8)
        else:  # decoupled decay, then the Adam step
            want = w * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=2e-6)


def test_clipping_and_default_weight_decay(model):
    cfg = _cfg(optimizer="sgd", learning_rate=1.0, max_grad_norm=1e-3, max_train_steps=1)
    grads = _first_grad(model, cfg)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    w0 = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    res = finetune(cfg, model, unet=copy.deepcopy(model.unet))
    assert res.log[0]["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    for n, p in res.unet.named_parameters():
        torch.testing.assert_close(
            p.detach().double(),
            w0[n].double() - grads[n].double() * 1e-3 / float(norm),
            rtol=1e-4,
            atol=1e-7,
        )
    from resalign_fast.eval.downstream import make_optimizer

    assert (
        make_optimizer(_cfg(optimizer="adamw"), [torch.zeros(1, requires_grad=True)]).defaults[
            "weight_decay"
        ]
        == 1e-2
    )
    assert (
        make_optimizer(_cfg(optimizer="adam"), [torch.zeros(1, requires_grad=True)]).defaults[
            "weight_decay"
        ]
        == 0.0
    )


def test_lora_trains_only_adapter_and_merge_is_exact(model, tmp_path):
    cfg = _cfg(algorithm="lora", rank=2, optimizer="adam", learning_rate=1e-2, max_train_steps=3)
    base = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    res = finetune(cfg, model, unet=copy.deepcopy(model.unet))
    named = dict(res.unet.named_parameters())
    lora = [n for n in named if ".lora_" in n]
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    assert any((named[n] != 0).any() for n in lora if ".lora_B." in n)  # B starts at 0 and moved
    for n, p in named.items():
        if ".lora_" not in n:
            assert torch.equal(p, base[n.replace(".base_layer.", ".")]), n
    save_finetuned(model, res.unet, cfg, tmp_path / "m")
    merged = load_model(tmp_path / "m").unet.eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 1, 16, 16, generator=g), torch.tensor([10, 700])
    emb = model.encode_prompts(["a handwritten digit one", "handwritten two"])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(x, t, emb).sample, res.unet(x, t, emb).sample, rtol=1e-4, atol=1e-5
        )
    assert (tmp_path / "m" / "lora" / "adapter_model.safetensors").is_file()


def test_dreambooth_prior_loss_present(model):
    kw = dict(
        loss="dreambooth",
        train_data="digit-3",
        instance_prompt="a sks digit",
        class_data="digit-5",
        optimizer="sgd",
        learning_rate=0.5,
        max_train_steps=2,
        max_grad_norm=0.0,
    )
    res1 = finetune(_cfg(prior_loss_weight=1.0, **kw), model, unet=copy.deepcopy(model.unet))
    res0 = finetune(_cfg(prior_loss_weight=0.0, **kw), model, unet=copy.deepcopy(model.unet))
    for rec in res1.log:
        assert rec["loss"] == pytest.approx(rec["instance_loss"] + rec["prior_loss"], rel=1e-5)
    assert res0.log[0]["instance_loss"] == pytest.approx(
        res1.log[0]["instance_loss"], rel=1e-6
    )  # same first batch
    assert res0.log[0]["loss"] == pytest.approx(res0.log[0]["instance_loss"], rel=1e-6)
    w1, w0 = dict(res1.unet.named_parameters()), dict(res0.unet.named_parameters())
    assert (
        max((w1[n] - w0[n]).abs().max().item() for n in w1) > 1e-6
    )  # the prior loss changes the update
    gen = finetune(
        _cfg(
            loss="dreambooth",
            train_data="digit-3",
            class_prompt="a handwritten digit",
            num_class_images=2,
            max_train_steps=1,
        ),
        model,
        unet=copy.deepcopy(model.unet),
    )
    assert "prior_loss" in gen.log[0]
    with pytest.raises(FinetuneError, match="class_prompt"):
        finetune(_cfg(loss="dreambooth", max_train_steps=1), model, unet=copy.deepcopy(model.unet))


def test_gradient_checkpointing_same_result_and_callbacks(model):
    seen = []
    a = finetune(
        _cfg(optimizer="adamw", learning_rate=1e-3, max_train_steps=3),
        model,
        unet=copy.deepcopy(model.unet),
        callback=lambda s, u: seen.append((s, u.training)),
        callback_steps=(0, 2, 3),
    )
    b = finetune(
        _cfg(optimizer="adamw", learning_rate=1e-3, max_train_steps=3, gradient_checkpointing=True),
        model,
        unet=copy.deepcopy(model.unet),
    )
    assert seen == [(0, False), (2, False), (3, False)]
    for (n, p), q in zip(a.unet.named_parameters(), b.unet.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_errors(model):
    with pytest.raises(FinetuneError, match="fp16"):
        finetune(
            _cfg(mixed_precision="fp16", max_train_steps=1), model, unet=copy.deepcopy(model.unet)
        )
    with pytest.raises(FinetuneError, match="neither an image folder"):
        finetune(_cfg(train_data="nope", max_train_steps=1), model, unet=copy.deepcopy(model.unet))
    with pytest.raises(FinetuneError, match="non-finite"):
        finetune(
            _cfg(optimizer="sgd", learning_rate=1e30, max_grad_norm=0.0, max_train_steps=3),
            model,
            unet=copy.deepcopy(model.unet),
        )
    with pytest.raises(ConfigError, match="optimizer"):
        _cfg(optimizer="lion")


def test_cli_smoke(tiny_model_dir, tmp_path, capsys):
    from resalign_fast.finetune import main

    out = tmp_path / "ft"
    argv = [
        "--pretrained_model_name_or_path",
        str(tiny_model_dir),
        "--output_dir",
        str(out),
        "--max_train_steps",
        "4",
        "--train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--checkpointing_steps",
        "2",
    ]
    assert main(argv) == 0
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    m = load_model(out / "model")
    before = load_model(tiny_model_dir)
    assert any(not torch.equal(p, q) for p, q in zip(m.unet.parameters(), before.unet.parameters()))
    assert (out / "checkpoint-2" / "unet").is_dir()
    assert main(argv) == 2 and "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path / "x"), "--optimizer", "lion"])
    assert (
        main(
            [
                "--output_dir",
                str(tmp_path / "y"),
                "--pretrained_model_name_or_path",
                str(tmp_path / "none"),
            ]
        )
        == 2
    )


def test_config_roundtrip_and_ranges(tmp_path):
    from resalign_fast.cli import parse_dataclass
    from resalign_fast.config import to_toml

    cfg = _cfg(
        instance_prompt='a "sks" digit \\ one', learning_rate=3e-4, gradient_checkpointing=True
    )
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    back, _ = parse_dataclass(FinetuneConfig, ["--config", str(tmp_path / "c.toml")])
    assert back == cfg
    flag, _ = parse_dataclass(
        FinetuneConfig, ["--config", str(tmp_path / "c.toml"), "--learning_rate", "1e-3"]
    )
    assert flag.learning_rate == 1e-3 and flag.instance_prompt == cfg.instance_prompt
    with pytest.raises(ConfigError, match="learning_rate"):
        _cfg(learning_rate=-1)
    with pytest.raises(ConfigError, match="unknown"):
        _cfg(lr=1e-3)


def test_bf16_autocast_on_cpu_trains_fp32_weights(model):
    w0 = [p.detach().clone() for p in model.unet.parameters()]
    res = finetune(
        _cfg(mixed_precision="bf16", optimizer="adam", learning_rate=1e-3, max_train_steps=2),
        model,
        unet=copy.deepcopy(model.unet),
    )
    ps = list(res.unet.parameters())
    assert all(p.dtype == torch.float32 for p in ps)
    assert all(torch.isfinite(p).all() for p in ps) and any(
        not torch.equal(p, q) for p, q in zip(ps, w0)
    )
    full = finetune(
        _cfg(optimizer="adam", learning_rate=1e-3, max_train_steps=2),
        model,
        unet=copy.deepcopy(model.unet),
    )
    assert res.log[0]["loss"] == pytest.approx(
        full.log[0]["loss"], rel=0.05
    )  # same batch, bf16 rounding only
