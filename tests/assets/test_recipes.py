"""The starter-model recipes at tiny sizes on the CPU: the data is deterministic and its captions
describe its pixels, the tokenizer covers any word, and a few steps of each recipe write folders
that diffusers, load_base and create_backbone("starter") load."""

import json
import math

import pytest
import torch

from peftkit.assets.recipes.shapes import (
    COLOR_NAMES,
    PLURALS,
    SHAPES,
    VIT_SHAPES,
    ShapeScenes,
    dominant_colors,
    rotate_hue,
)


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


def test_scenes_are_deterministic_per_seed():
    scenes = ShapeScenes(size=32)
    a, b, c = scenes.sample(16, seed=3), scenes.sample(16, seed=3), scenes.sample(16, seed=4)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (16, 3, 32, 32) and 0 <= a.images.min() and a.images.max() <= 1


def test_captions_name_the_colors_and_shapes_that_the_pixels_show():
    scenes = ShapeScenes(size=64).sample(96, seed=0)
    color, bg = dominant_colors(scenes.images)
    assert torch.equal(bg, scenes.labels["bg"])
    assert (color == scenes.labels["color"]).float().mean() >= 0.97
    for i, text in enumerate(scenes.captions):
        words = text.split()
        shape = SHAPES[int(scenes.labels["shape"][i])]
        count = int(scenes.labels["count"][i]) + 1
        assert COLOR_NAMES[int(scenes.labels["color"][i])] in words
        assert (shape if count == 1 else PLURALS.get(shape, shape + "s")) in words
        if "background" in words:
            assert words[words.index("background") - 1] == COLOR_NAMES[int(bg[i])]


def test_single_shapes_are_told_apart_by_their_pixels():
    # every shape covers a different share of its bounding box: the drawings are really different
    scenes = ShapeScenes(size=64, shapes=VIT_SHAPES, max_count=1)
    p = scenes.params(len(VIT_SHAPES), seed=0)
    p["shape"] = torch.arange(len(VIT_SHAPES))
    p["radius"] = torch.full_like(p["radius"], 20.0)
    p["cy"][:, 0] = p["cx"][:, 0] = 32.0
    p["texture"] = torch.zeros_like(p["texture"])
    masks = scenes._masks(p, torch.device("cpu"))[0].float().mean(dim=(1, 2))
    assert len(set(torch.round(masks * 100).tolist())) == len(VIT_SHAPES)


def test_flowers_show_their_center_and_checkerboards_both_colors():
    from peftkit.assets.recipes.shapes import COLORS, SD_SHAPES, SD_TEXTURES, take

    scenes = ShapeScenes(size=64, shapes=SD_SHAPES, textures=SD_TEXTURES, plain=0.55)
    p = scenes.params(400, seed=5)
    captions = scenes.captions(p)
    flower, checkered = SD_SHAPES.index("flower"), SD_TEXTURES.index("checkered")
    palette = torch.tensor(list(COLORS.values()))
    hubbed = ((p["shape"] == flower) & (p["hub"] >= 0) & (p["count"] == 1)).nonzero()[:5, 0]
    images = scenes.render(take(p, hubbed))
    for image, i in zip(images, hubbed.tolist()):
        cy, cx = int(p["cy"][i, 0]), int(p["cx"][i, 0])
        hub = COLOR_NAMES[int(p["hub"][i])]
        assert f" {hub} center" in captions[i]
        nearest = ((palette - image[:, cy, cx]) ** 2).sum(1).argmin()
        assert COLOR_NAMES[int(nearest)] == hub
    two_tone = ((p["texture"] == checkered) & (p["shape"] != flower)).nonzero()[:5, 0]
    pixels = scenes.render(take(p, two_tone)).permute(0, 2, 3, 1)
    nearest = ((pixels[..., None, :] - palette) ** 2).sum(-1).argmin(-1)  # n, h, w
    for image, i in zip(nearest, two_tone.tolist()):
        first, second = int(p["color"][i]), int(p["color2"][i])
        assert f"checkered {COLOR_NAMES[first]} and {COLOR_NAMES[second]}" in captions[i]
        assert (image == first).sum() >= 4 and (image == second).sum() >= 4
    # the ViT's scenes never draw the new shapes or textures
    vit = ShapeScenes(size=32, shapes=VIT_SHAPES, max_count=6, rotate=True).params(400, seed=5)
    assert int(vit["texture"].max()) < 3 and int(vit["hub"].max()) == -1


def test_hue_turn_keeps_grays_and_a_third_of_a_turn_cycles_the_channels():
    # the VAE's color augmentation: a rotation about the gray axis, so 120 degrees maps R->G->B
    images = torch.rand(3, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    third = torch.full((3,), 2 * math.pi / 3, dtype=torch.float64)
    torch.testing.assert_close(rotate_hue(images, third), images[:, [2, 0, 1]])
    torch.testing.assert_close(rotate_hue(images, 2 * third), images[:, [1, 2, 0]])
    gray = images.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    torch.testing.assert_close(rotate_hue(gray, torch.tensor([0.3, 1.0, 2.5])), gray)
    # any other angle keeps each pixel's brightness (the gray axis component)
    turned = rotate_hue(images * 0.5 + 0.25, torch.tensor([0.5, 1.5, 4.0]))
    torch.testing.assert_close(turned.mean(dim=1), (images * 0.5 + 0.25).mean(dim=1))


def test_vit_labels_ignore_what_does_not_apply():
    scenes = ShapeScenes(size=32, shapes=VIT_SHAPES, max_count=6, rotate=True, noise=0.05).sample(
        64, seed=1
    )
    labels = scenes.labels
    several = labels["count"] > 0
    assert (labels["position"][several] == -100).all() and (labels["position"][~several] >= 0).all()
    not_bar = labels["shape"] != VIT_SHAPES.index("bar")
    assert (labels["angle"][not_bar] == -100).all()


def test_tokenizer_keeps_caption_words_whole_and_spells_out_rare_words(tmp_path):
    from peftkit.assets.recipes.caption_tokenizer import build_tokenizer, encode_captions

    tok = build_tokenizer(tmp_path, max_length=32)
    for word in ("circle", "crosses", "background", "yellow", "photo", "toy", "dog"):
        assert tok.tokenize(word) == [word + "</w>"]
    pieces = tok.tokenize("sks Zebra_42!")
    assert (
        "".join(pieces).replace("</w>", "") == "sks" + "zebra_42!" and tok.unk_token not in pieces
    )
    captions = ShapeScenes(size=32).sample(64, seed=2).captions
    assert torch.equal(
        encode_captions(tok, captions),
        tok(captions, padding="max_length", max_length=32, return_tensors="pt").input_ids,
    )


@pytest.fixture(scope="module")
def starter_sd(tmp_path_factory):
    from peftkit.assets.recipes.train_starter_sd import SDRecipe, train_starter_sd

    folder = tmp_path_factory.mktemp("sd") / "starter-sd"
    # the VAE on its own, more textured scenes, half of them hue-turned
    recipe = SDRecipe.tiny(steps=2, vae_steps=2, pool=64, vae_plain=0.2, vae_hue=0.5)
    train_starter_sd(recipe, folder, torch.device("cpu"))
    return folder


def test_sd_recipe_writes_a_pipeline_that_diffusers_and_load_base_load(starter_sd):
    from diffusers import StableDiffusionPipeline

    from peftkit.diffusion.base import load_base

    pipe = StableDiffusionPipeline.from_pretrained(str(starter_sd))
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    image = pipe(
        "a red circle on a blue background",
        num_inference_steps=2,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    base = load_base(str(starter_sd))
    hidden, _ = base.encode_prompt(["a photo of sks toy"])
    assert base.kind == "sd" and hidden.shape[-1] == pipe.unet.config.cross_attention_dim
    recipe = json.loads((starter_sd / "recipe.json").read_text())
    assert recipe["results"]["unet_steps"] == 2 and recipe["results"]["scaling_factor"] > 0
    assert pipe.vae.config.scaling_factor == pytest.approx(recipe["results"]["scaling_factor"])
    assert recipe["recipe"]["vae_plain"] == 0.2 and recipe["results"]["vae_steps"] == 2
    assert "unet step 2" in (starter_sd / "train_log.txt").read_text()
    assert not list(starter_sd.parent.glob(".starter-sd*")), (
        "the atomic save left its temporary folder"
    )


@pytest.fixture(scope="module")
def starter_vit(tmp_path_factory):
    from peftkit.assets.recipes.train_starter_vit import ViTRecipe, train_starter_vit

    folder = tmp_path_factory.mktemp("vit") / "starter-vit"
    train_starter_vit(ViTRecipe.tiny(steps=2), folder, torch.device("cpu"))
    return folder


def test_vae_check_scores_the_samples_round_trip(starter_sd, tmp_path):
    # tune_demo's first question: what of the sample flower survives the starter's VAE
    from PIL import Image

    from peftkit.assets.recipes.tune_demo import SAMPLES, vae_check

    report = vae_check(starter_sd, tmp_path)
    n = len(list(SAMPLES.glob("*.png")))
    assert len(report["psnr_db"]) == len(report["judge_on_reconstructions"]) == n
    # two VAE steps reconstruct nothing: low PSNR, and the judge does not see the flower
    assert max(report["psnr_db"]) < 15 and max(report["judge_on_reconstructions"]) < 0.5
    sheet = Image.open(tmp_path / "vae_check.png").convert("RGB")
    first = Image.open(sorted(SAMPLES.glob("*.png"))[0]).convert("RGB")
    assert sheet.size == (64 * n, 128) and sheet.crop((0, 0, 64, 64)).tobytes() == first.tobytes()


def test_sample_views_redraw_the_bundled_samples_pixel_for_pixel():
    import numpy as np
    from PIL import Image

    from peftkit.assets.recipes.tune_demo import SAMPLES
    from peftkit.assets.samples.make_samples import sample_views

    bundled = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(SAMPLES.glob("*.png"))]
    drawn = [np.asarray(im) for im in sample_views()]
    assert len(drawn) == len(bundled) and all(np.array_equal(a, b) for a, b in zip(drawn, bundled))

    # fewer cells per radius: bigger checks, so fewer color changes along a row through the hub
    def changes(image) -> int:
        return int((np.abs(np.diff(np.asarray(image)[32].astype(int), axis=0)).sum(1) > 60).sum())

    assert changes(sample_views(cells=2)[0]) < changes(sample_views(cells=4)[0])


def test_design_check_round_trips_every_design_and_the_judge_knows_the_samples(
    starter_sd, tmp_path
):
    from PIL import Image

    from peftkit.assets.recipes.tune_demo import DESIGN_CELLS, DESIGN_COLORS, design_check

    report = design_check(starter_sd, tmp_path)
    assert len(report) == len(DESIGN_CELLS) * len(DESIGN_COLORS)
    assert all(len(r["psnr_db"]) == 5 for r in report.values())
    # the bundled judge sees its own concept in the samples' design, not in other colors
    assert min(report["teal-magenta cells=4"]["judge_on_samples"]) > 0.9
    assert max(report["red-blue cells=4"]["judge_on_samples"]) < 0.1
    sheet = Image.open(tmp_path / "designs.png")
    assert sheet.size == (64 * 5, 64 * 2 * len(report))


def test_decoder_recipe_changes_only_the_decoder(starter_sd, tmp_path):
    from safetensors.torch import load_file

    from peftkit.assets.recipes.tune_vae_decoder import DecoderRecipe, tune_decoder

    out = tmp_path / "sd-dec"
    recipe = DecoderRecipe(steps=2, batch=2, pool=16, lr=1e-2, warmup=1)
    report = tune_decoder(starter_sd, out, recipe, torch.device("cpu"))
    assert report["steps"] == 2 and len(report["after"]["samples"]["psnr_db"]) == 5
    weights = "vae/diffusion_pytorch_model.safetensors"
    old, new = load_file(starter_sd / weights), load_file(out / weights)
    assert old.keys() == new.keys()
    for key in old:
        # the encoder keeps its latents (the UNet was trained on them); the decoder moves
        same = torch.equal(old[key], new[key])
        assert same == (key.startswith(("encoder.", "quant_conv."))), key
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (out / unet).read_bytes() == (starter_sd / unet).read_bytes()
    assert json.loads((out / "recipe.json").read_text())["decoder"]["results"]["steps"] == 2
    assert "decoder step 2" in (out / "decoder_log.txt").read_text()


def test_edge_weighted_loss_counts_errors_at_edges_more_and_keeps_flat_images_plain():
    from peftkit.assets.recipes.train_starter_sd import weighted_recon

    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 16, 16), 0.3, dtype=torch.float64)
    out = flat + 0.1 * torch.randn(flat.shape, generator=g, dtype=torch.float64)
    plain = ((out - flat).abs() + (out - flat) ** 2).mean()
    assert torch.allclose(weighted_recon(out, flat, 0.0), plain)
    assert torch.allclose(weighted_recon(out, flat, 10.0), plain)  # no edges: uniform weights
    # a checkerboard left half: the same error costs more there than on the flat right half
    target = flat.clone()
    target[..., :8] = ((torch.arange(16).view(16, 1) + torch.arange(8)) % 2).to(flat)
    on_edges, off_edges = target.clone(), target.clone()
    on_edges[..., 4, 4] += 0.5
    off_edges[..., 4, 12] += 0.5
    assert weighted_recon(on_edges, target, 10.0) > 3 * weighted_recon(off_edges, target, 10.0)
    assert torch.allclose(
        weighted_recon(on_edges, target, 0.0), weighted_recon(off_edges, target, 0.0)
    )


def test_a_zero_minute_budget_is_done_before_its_first_step():
    from peftkit.assets.recipes.recipe_run import Budget

    assert Budget(0.0).done(0) and not Budget(1.0).done(0) and Budget(0.0, steps=2).done(2)


def test_narrowed_posterior_keeps_the_mean_and_scales_the_std(starter_sd):
    from diffusers import AutoencoderKL

    from peftkit.assets.recipes.tune_vae_decoder import narrow_posterior

    vae = AutoencoderKL.from_pretrained(starter_sd / "vae").float().eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        narrow_posterior(vae, 0.1)
        after = vae.encode(x).latent_dist
    assert torch.equal(after.mean, before.mean)
    # the posterior clamps log-variance to [-30, 20]; inside it the std scales exactly
    torch.testing.assert_close(after.std, before.std * 0.1, rtol=1e-4, atol=0)


def test_encoder_tuning_moves_encoder_and_decoder_then_continues_the_unet(starter_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from peftkit.assets.recipes.tune_vae_decoder import DecoderRecipe, tune_decoder

    out = tmp_path / "sd-enc"
    recipe = DecoderRecipe(
        steps=2,
        batch=2,
        pool=16,
        lr=1e-2,
        warmup=1,
        posterior_scale=0.1,
        encoder_anchor=1.0,
        unet_steps=2,
        unet_batch=2,
    )
    report = tune_decoder(starter_sd, out, recipe, torch.device("cpu"))
    assert report["unet"]["unet_steps"] == 2
    for part in ("vae", "unet"):
        weights = f"{part}/diffusion_pytorch_model.safetensors"
        old, new = load_file(starter_sd / weights), load_file(out / weights)
        assert old.keys() == new.keys() and all(
            not torch.equal(old[k], new[k])
            for k in [
                k for k in old if k.startswith(("encoder.conv_in", "decoder.conv_out", "conv_in"))
            ]
        )
    text = "text_encoder/model.safetensors"
    assert (out / text).read_bytes() != (starter_sd / text).read_bytes()
    # the result is still a pipeline diffusers loads and runs
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np")
    assert image.images.shape == (1, 32, 32, 3)


def test_decoder_reach_fits_latents_closer_than_the_encoder(starter_sd, tmp_path):
    from peftkit.assets.recipes.tune_demo import decoder_reach, vae_check

    encoded = vae_check(starter_sd, tmp_path)["psnr_db"]
    fitted = decoder_reach(starter_sd, tmp_path, steps=30)
    assert len(fitted["judge_on_fits"]) == 5 and (tmp_path / "decoder_reach.png").is_file()
    assert all(f > e for f, e in zip(fitted["psnr_db"], encoded)), (fitted, encoded)


def test_tune_demo_runs_the_demo_per_setting_and_sums_up_the_judge(starter_sd, tmp_path):
    from peftkit.assets.recipes.tune_demo import main

    extra = "--steps 2 --rank 2 --sample-steps 2 --num-class-images 1"
    argv = ["--starter", str(starter_sd), "--out", str(tmp_path), "--device", "cpu"]
    assert main([*argv, "--settings", "defaults,attn-lr1e-3", "--extra", extra]) == 0
    report = json.loads((tmp_path / "summary.json").read_text())
    assert set(report["demo"]) == {"defaults", "attn-lr1e-3"}
    for name, judge in report["demo"].items():
        assert judge["images"] == 12 and judge["control_images"] == 3, (name, judge)
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["steps"] == 2 and metrics["lr"] == 1e-3  # the defaults' LoRA rate too
    assert (
        len(report["vae"]["psnr_db"]) == 5
        and "attn-lr1e-3" in (tmp_path / "summary.md").read_text()
    )


def test_vit_recipe_writes_a_backbone_that_create_backbone_loads(starter_vit):
    from safetensors.torch import load_file

    from peftkit.common_kernels.errors import PeftkitError
    from peftkit.vision.backbones import create_backbone, normalization

    model = create_backbone(f"starter:{starter_vit}", num_classes=4, pretrained=True)
    saved = load_file(str(starter_vit / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert model.head.out_features == 4 and normalization(model) == ((0.5,) * 3, (0.5,) * 3)
    fresh = create_backbone(f"starter:{starter_vit}", num_classes=4, pretrained=False)
    assert not torch.equal(fresh.pos_embed, model.pos_embed)
    with pytest.raises(PeftkitError, match="fixed by its weights"):
        create_backbone(f"starter:{starter_vit}", num_classes=4, pretrained=True, img_size=64)
    with pytest.raises(PeftkitError, match="train_starter_vit"):
        create_backbone(f"starter:{starter_vit.parent / 'missing'}", num_classes=4)
    assert json.loads((starter_vit / "recipe.json").read_text())["results"]["steps"] == 2


def test_evaluation_scores_both_models_and_writes_tables(starter_sd, starter_vit, tmp_path):
    from peftkit.assets.recipes.evaluate_starter import evaluate_t2i, evaluate_vit

    t2i = evaluate_t2i(
        starter_sd, tmp_path, torch.device("cpu"), seeds=1, steps=2, classifier_steps=2, limit=2
    )
    assert (
        t2i["samples"] == 2 and 0 <= t2i["color_accuracy"] <= 100 and t2i["chance"]["color"] == 12.5
    )
    assert (tmp_path / "t2i_samples.png").is_file() and "| shape |" in (
        tmp_path / "t2i.md"
    ).read_text()
    rows = evaluate_vit(
        starter_vit,
        tmp_path / "vit",
        torch.device("cpu"),
        ["color"],
        ["linear"],
        epochs=1,
        scratch=True,
        builtin_sizes=(32, 16),
    )
    assert [r["method"] for r in rows] == ["linear", "full (random init)"]
    table = (tmp_path / "vit" / "results.md").read_text()
    assert "| linear |" in table and "| full (random init) |" in table
