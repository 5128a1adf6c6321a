"""The Stable Diffusion path on CPU with a tiny SD-format pipeline built here (random weights):
prepare_data -> train -> export -> StableDiffusionPipeline.from_pretrained / load_lora_weights ->
generate; frozen parts in bf16 and the encoded-data cache."""

import csv
import json
import tempfile

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_unet_config

from resalign_fast import prepare_data, train
from resalign_fast.data.encoded import encode_set
from resalign_fast.data.sets import load_image_folder
from resalign_fast.models.pipeline import load_model, save_model

RES = 16  # pixels; latents are 4 x 8 x 8 (VAE scale 2)


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    """A StableDiffusionPipeline folder: tiny UNet/VAE/CLIP text model, PNDM scheduler, saved
    with save_pretrained."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from resalign_fast.models.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config(in_channels=4, out_channels=4))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=RES,
        layers_per_block=1,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            projection_dim=8,
        )
    )
    with tempfile.TemporaryDirectory() as d:
        tok = build_clip_tokenizer(d, model_max_length=16)
    sched = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = tmp_path_factory.mktemp("tiny_sd")
    pipe.save_pretrained(out)
    return out


def _prepare(sd_dir, prompts_file, out, *extra):
    return prepare_data.main(
        [
            "--prompts",
            str(prompts_file),
            "--out",
            str(out),
            "--pretrained_model_name_or_path",
            str(sd_dir),
            "--steps",
            "2",
            "--device",
            "cpu",
            "--batch_size",
            "3",
            *extra,
        ]
    )


def _same_safetensors(a, b):
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_prepare_train_export_load_generate(tiny_sd_dir, tiny_ft_space, tmp_path):
    from diffusers import StableDiffusionPipeline

    (tmp_path / "harm.csv").write_text('id,prompt\n1,a nude figure\n2,"nude, oil painting"\n3,\n')
    (tmp_path / "benign.txt").write_text("a cat\n\na red car\n")
    assert (
        _prepare(tiny_sd_dir, tmp_path / "harm.csv", tmp_path / "harm", "--images_per_prompt", "2")
        == 0
    )
    assert _prepare(tiny_sd_dir, tmp_path / "benign.txt", tmp_path / "benign") == 0
    with open(tmp_path / "harm" / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == ["a nude figure"] * 2 + [
        "nude, oil painting"
    ] * 2  # blank prompt skipped
    harm = load_image_folder(tmp_path / "harm", RES, 3)
    assert harm.images.shape == (4, 3, RES, RES) and not harm.skipped
    # same prompt, different image index: different noise, different image
    assert not torch.equal(harm.images[0], harm.images[1])

    args = [
        "--pretrained_model_name_or_path",
        str(tiny_sd_dir),
        "--harmful_data",
        str(tmp_path / "harm"),
        "--preserve_data",
        str(tmp_path / "benign"),
        "--ft_data",
        str(tmp_path / "benign"),
        "--ft_space",
        str(tiny_ft_space),
        "--output_dir",
        str(tmp_path / "out"),
        "--run_name",
        "r",
        "--outer_steps",
        "2",
        "--configs_per_step",
        "2",
        "--batch_size",
        "2",
        "--iters",
        "2",
        "--lora_rank",
        "2",
        "--lora_alpha",
        "8",
        "--lr",
        "1e-2",
        "--samples_per_prompt",
        "1",
        "--sample_steps",
        "2",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert train.main(args) == 0
    run = tmp_path / "out" / "r"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    index = json.loads((run / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == [
        "diffusers",
        "UNet2DConditionModel",
    ]
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"] and index["safety_checker"] == [
        None,
        None,
    ]
    for sub, f in (("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        assert _same_safetensors(
            tiny_sd_dir / sub / f"{f}.safetensors", run / "model" / sub / f"{f}.safetensors"
        )

    pipe = StableDiffusionPipeline.from_pretrained(run / "model", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(
        "a cat",
        num_inference_steps=2,
        height=RES,
        width=RES,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert img.shape == (1, 3, RES, RES) and torch.isfinite(img).all()
    from resalign_fast.models.sampling import generate

    ours = generate(load_model(run / "model"), ["a cat", "a dog"], steps=2, guidance=7.5)
    assert ours.shape == (2, 3, RES, RES) and torch.isfinite(ours).all()

    # base + exported LoRA (alpha/rank = 4 read from the file's metadata) == the exported merged
    # UNet
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, local_files_only=True)
    g = torch.Generator().manual_seed(1)
    x, t, e = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 700]),
        torch.randn(2, 16, 8, generator=g),
    )
    with torch.no_grad():
        plain = base.unet(x, t, e).sample
        base.load_lora_weights(run / "lora")
        with_lora = base.unet(x, t, e).sample
        merged = pipe.unet(x, t, e).sample
    err, moved = (with_lora - merged).abs().max().item(), (merged - plain).abs().max().item()
    assert err < 1e-5 * max(1.0, merged.abs().max().item()) and moved > 1000 * err, (err, moved)


def test_frozen_bf16_encoding_cache_and_export(tiny_sd_dir, tmp_path, caplog):
    from resalign_fast.data.sets import PromptImageSet

    g = torch.Generator().manual_seed(0)
    data = PromptImageSet(torch.rand(3, 3, RES, RES, generator=g) * 2 - 1, ["a", "b c", "a"])
    m32 = load_model(tiny_sd_dir)
    m16 = load_model(tiny_sd_dir, frozen_dtype="bf16")
    assert m16.vae.dtype == torch.bfloat16 and m16.text_encoder.dtype == torch.bfloat16
    assert m16.unet.dtype == torch.float32 and m16.fingerprint != m32.fingerprint
    cache = tmp_path / "cache"
    e32, e16 = (
        encode_set(m32, data, torch.device("cpu"), cache),
        encode_set(m16, data, torch.device("cpu"), cache),
    )
    assert len(list(cache.glob("*.pt"))) == 2  # keyed by dtype too
    assert e16.x0.dtype == torch.float32 and not torch.equal(e16.x0, e32.x0)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(e16.x0, e32.x0) < 3e-2 and rel(e16.emb, e32.emb) < 3e-2

    def boom(*a, **k):
        raise AssertionError("encoded again instead of read from the cache")

    m32.to_latents, m32.encode_prompts = boom, boom
    again = encode_set(m32, data, torch.device("cpu"), cache)
    assert torch.equal(again.x0, e32.x0) and torch.equal(again.emb, e32.emb)
    # other data -> another key -> encoded (boom)
    with pytest.raises(AssertionError, match="encoded again"):
        encode_set(m32, PromptImageSet(data.images, ["a", "b c", "x"]), torch.device("cpu"), cache)
    # a damaged cache file is re-encoded, not trusted
    m16b = load_model(tiny_sd_dir, frozen_dtype="bf16")
    for f in cache.glob("*.pt"):
        f.write_bytes(b"garbage")
    fresh = encode_set(m16b, data, torch.device("cpu"), cache)
    assert torch.equal(fresh.x0, e16.x0) and "re-encoding" in caplog.text

    # export of a bf16-frozen model keeps the original fp32 VAE / text encoder files
    save_model(m16, tmp_path / "exp")
    assert _same_safetensors(
        tiny_sd_dir / "vae" / "diffusion_pytorch_model.safetensors",
        tmp_path / "exp" / "vae" / "diffusion_pytorch_model.safetensors",
    )
    assert load_model(tmp_path / "exp").vae.dtype == torch.float32


def test_single_file_goes_through_diffusers_offline(tiny_sd_dir, tmp_path, monkeypatch):
    """Our wrapper of diffusers' single-file loader: offline, with the local config folder, and its
    result used as a latent SD model. (A real single-file round trip needs an LDM-format
    checkpoint.)"""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    ckpt = tmp_path / "sd.safetensors"
    save_file({"w": torch.zeros(1)}, str(ckpt))
    seen = {}

    def fake(path, **kw):
        seen.update(kw, path=path)
        return StableDiffusionPipeline.from_pretrained(tiny_sd_dir, local_files_only=True)

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", staticmethod(fake))
    m = load_model(ckpt, single_file_config=str(tiny_sd_dir))
    assert (
        seen["path"] == str(ckpt)
        and seen["local_files_only"] is True
        and seen["config"] == str(tiny_sd_dir)
    )
    assert seen["safety_checker"] is None
    assert m.resolution == RES and m.image_channels == 3 and m.scheduler_class == "PNDMScheduler"
    assert type(m.scheduler).__name__ == "DDPMScheduler" and m.source == str(ckpt) and m.fingerprint


def test_bf16_frozen_parts_in_training_with_full_theta(
    tiny_sd_dir, tiny_ft_space, tmp_path, monkeypatch
):
    """frozen_dtype bf16 through train: VAE/text encoder and full theta's frozen UNet copy in bf16
    (ESD needs that copy), finite training, fp32 files exported."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(RES, RES, 3, generator=g) * 255).byte().numpy()).save(
            data / f"{i}.png"
        )
    (data / "metadata.csv").write_text(
        "file_name,text\n" + "".join(f"{i}.png,thing {i}\n" for i in range(3))
    )
    seen = {}
    real_load = train.load_data

    def spy(cfg, model, device):
        seen["dtypes"] = (model.vae.dtype, model.text_encoder.dtype, model.unet.dtype)
        return real_load(cfg, model, device)

    monkeypatch.setattr(train, "load_data", spy)
    args = [
        "--pretrained_model_name_or_path",
        str(tiny_sd_dir),
        "--harmful_data",
        str(data),
        "--preserve_data",
        str(data),
        "--ft_data",
        str(data),
        "--ft_space",
        str(tiny_ft_space),
        "--output_dir",
        str(tmp_path / "out"),
        "--run_name",
        "r",
        "--frozen_dtype",
        "bf16",
        "--outer_steps",
        "1",
        "--configs_per_step",
        "1",
        "--batch_size",
        "2",
        "--iters",
        "1",
        "--theta",
        "full",
        "--harmful_loss",
        "esd",
        "--samples_per_prompt",
        "0",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert train.main(args) == 0
    assert seen["dtypes"] == (torch.bfloat16, torch.bfloat16, torch.float32)
    m = json.loads((tmp_path / "out" / "r" / "metrics.jsonl").read_text())
    assert not m["skipped"] and m["hypergrad_norm"] > 0
    assert _same_safetensors(
        tiny_sd_dir / "text_encoder" / "model.safetensors",
        tmp_path / "out" / "r" / "model" / "text_encoder" / "model.safetensors",
    )
