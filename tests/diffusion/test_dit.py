"""SD3 and Flux on tiny pipelines the tests build (tiny_dit.py): prompt encoding equals the
pipelines' own, the flow-matching draws follow diffusers' formulas, training lowers the loss,
the saved LoRA loads with plain `load_lora_weights` and gives peftkit's transformer output
(rel < 1e-5), train-concepts routes several Flux jobs through one transformer, and a folder of an
unsupported family is refused naming the supported ones."""

import json

import pytest
import torch

from peftkit.common_kernels.adapter_file import read_tensors
from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.training.engine import TrainConfig
from peftkit.diffusion import dit
from peftkit.diffusion.base import load_base
from peftkit.diffusion.dreambooth import UNET_FILE, ConceptConfig, train_concept
from peftkit.diffusion.multitenant_cli import load_jobs, train_concepts
from peftkit.diffusion.objective import (
    FlowMatching,
    flow_loss_weights,
    flow_matching_targets,
    flow_timestep_density,
)

from .tiny_dit import build_tiny_pipelines

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


@pytest.fixture(scope="module")
def dit_paths(tiny_sd_path, tmp_path_factory):
    return build_tiny_pipelines(tiny_sd_path, tmp_path_factory.mktemp("tiny-dit"))


def _pipeline(kind, path):
    import diffusers

    return getattr(diffusers, PIPELINES[kind]).from_pretrained(path)


def _pipeline_encoding(pipe, kind, prompts):
    # The tiny T5 tokenizer holds 16 tokens, which peftkit caps T5's sequence at.
    options = {"do_classifier_free_guidance": False} if kind == "sd3" else {}
    second = [None] * (2 if kind == "sd3" else 1)
    return pipe.encode_prompt(prompts, *second, max_sequence_length=16, **options)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_prompt_conditioning_equals_the_pipelines_encode_prompt(dit_paths, kind):
    base = load_base(str(dit_paths[kind]))
    assert base.component == "transformer" and base.native_resolution == (
        16 if kind == "sd3" else 256
    )
    prompts = ["a photo of sks toy", "a dog"]
    hidden, extra = base.encode_prompt(prompts)
    out = _pipeline_encoding(base.pipe, kind, prompts)
    pooled = out[2] if kind == "sd3" else out[1]
    torch.testing.assert_close(hidden, out[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(extra["pooled_projections"], pooled, rtol=0, atol=1e-5)
    if kind == "flux":  # FLUX.1-dev-like: guidance-distilled, trained at diffusers' 3.5
        assert extra["guidance"].tolist() == [3.5, 3.5]


def test_flux_packing_and_position_ids_equal_the_pipelines():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    packed = dit.pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 8))
    assert torch.equal(dit.unpack_latents(packed, 6, 8), latents)
    # The pipeline's unpack takes pixel sizes (latents x the VAE's factor, here 8).
    assert torch.equal(FluxPipeline._unpack_latents(packed, 48, 64, 8), latents)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    assert torch.equal(dit.image_ids(6, 8, "cpu", torch.float32), ids)


@pytest.mark.parametrize("dynamic", [False, True])
def test_flow_sigmas_equal_the_schedulers(dynamic):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic)
    schedule = FlowMatching.of(scheduler.config)
    torch.testing.assert_close(schedule.sigmas, scheduler.sigmas, rtol=0, atol=1e-7)
    torch.testing.assert_close(schedule.sigmas * 1000, scheduler.timesteps, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none", "sigma_sqrt", "cosmap"])
def test_timestep_density_and_weights_follow_diffusers(scheme):
    from diffusers.training_utils import (
        compute_density_for_timestep_sampling,
        compute_loss_weighting_for_sd3,
    )

    schedule = FlowMatching(torch.linspace(1, 0.001, 1000), scheme)
    torch.manual_seed(3)
    ours = flow_timestep_density(schedule, 4096, torch.device("cpu"))
    torch.manual_seed(3)
    theirs = compute_density_for_timestep_sampling(scheme, 4096, 0.0, 1.0, 1.29)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    sigmas = torch.rand(64, dtype=torch.float64) * 0.9 + 0.05
    weights = flow_loss_weights(scheme, sigmas)
    reference = compute_loss_weighting_for_sd3(scheme, sigmas).float()
    torch.testing.assert_close(
        torch.ones_like(reference) if weights is None else weights, reference, rtol=0, atol=0
    )


def test_flow_targets_are_the_velocity_between_latents_and_noise():
    schedule = FlowMatching(torch.linspace(1, 0.001, 1000, dtype=torch.float64), "logit_normal")
    latents = torch.randn(8, 4, 6, 6, dtype=torch.float64)
    torch.manual_seed(0)
    noisy, t, target, weight = flow_matching_targets(schedule, latents)
    torch.manual_seed(0)
    noise = torch.randn_like(latents)
    sigma = schedule.sigmas[(flow_timestep_density(schedule, 8, latents.device) * 1000).long()]
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * latents + s * noise, rtol=0, atol=1e-12)
    torch.testing.assert_close(target, noise - latents, rtol=0, atol=1e-12)
    torch.testing.assert_close(t, sigma * 1000)
    assert weight is None


def test_min_snr_is_refused_for_flow_matching(dit_paths):
    base = load_base(str(dit_paths["sd3"]))
    with pytest.raises(PeftkitError, match="weighting_scheme"):
        from peftkit.diffusion.objective import denoising_targets

        denoising_targets(base.noise_scheduler(), torch.zeros(1, 4, 2, 2), min_snr_gamma=5.0)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def trained(request, dit_paths, concept_dir, tmp_path_factory):
    """A LoRA on every transformer Linear (and CLIP LoRAs) trained 30 steps, saved; with the loss
    of the fixed set untrained and trained."""
    kind = request.param
    out = tmp_path_factory.mktemp(f"trained-{kind}")
    base = load_base(str(dit_paths[kind]))
    config = ConceptConfig(
        "a photo of sks toy", resolution=16, rank=4, targets=["all-linear"], text_encoder_rank=2
    )
    train_config = TrainConfig(
        steps=30, batch_size=2, lr=3e-2, schedule="constant", progress=False, output_dir=str(out)
    )
    task, result = train_concept(base, concept_dir, config, train_config)
    trained_loss = task.fixed_loss()
    for handle in [task.unet_handle, *task.text_handles]:
        handle.disable()
    untrained = task.fixed_loss()
    for handle in [task.unet_handle, *task.text_handles]:
        handle.enable()
    return kind, base, task, out, trained_loss, untrained


def test_training_lowers_the_flow_matching_loss(trained):
    kind, _, task, _, trained_loss, untrained = trained
    assert trained_loss < 0.85 * untrained, (kind, trained_loss, untrained)


def test_saved_lora_loads_in_diffusers_with_peftkits_output(trained):
    kind, base, task, out, _, _ = trained
    keys = read_tensors(out / "pytorch_lora_weights.safetensors")[0].keys()
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder"} | (
        {"text_encoder_2"} if kind == "sd3" else set()
    )
    pipe = _pipeline(kind, base.source)
    pipe.load_lora_weights(str(out))
    prompts = ["a photo of sks toy", "a dog"]
    torch.manual_seed(0)
    noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([700.0, 150.0])
    task.model.eval()
    with torch.no_grad():
        hidden, extra = base.encode_prompt(prompts)  # through peftkit's CLIP LoRAs
        ours = base.predict(base.unet, noisy, t, hidden, extra)
        encoded = _pipeline_encoding(pipe, kind, prompts)
        theirs = base.predict(pipe.transformer, noisy, t, hidden, extra)
    torch.testing.assert_close(encoded[0], hidden, rtol=0, atol=1e-5)
    assert float((ours - theirs).norm() / ours.norm()) < 1e-5
    assert read_tensors(out / UNET_FILE)[1]["component"] == "transformer"


def test_inspect_and_convert_know_transformer_adapters(trained, tmp_path):
    from peftkit.diffusion.convert_cli import convert
    from peftkit.diffusion.inspect_cli import describe

    kind, _, _, out, _, _ = trained
    original = out / "pytorch_lora_weights.safetensors"
    lines = describe(original)
    assert any(line.startswith("components: ") and "transformer (" in line for line in lines)
    family = {"flux": "Flux", "sd3": "SD3"}[kind]
    assert any(line.startswith("made for: ") and family in line for line in lines), lines
    # diffusers -> peftkit -> diffusers gives the same transformer tensors back
    convert([str(original), str(tmp_path / "peftkit"), "--to", "peftkit"])
    ours = tmp_path / "peftkit" / "transformer.safetensors"
    assert read_tensors(ours)[1]["component"] == "transformer"
    convert([str(ours), str(tmp_path / "back.safetensors"), "--to", "diffusers"])
    before = {k: v for k, v in read_tensors(original)[0].items() if k.startswith("transformer.")}
    after = read_tensors(tmp_path / "back.safetensors")[0]
    assert after.keys() == before.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)
    with pytest.raises(PeftkitError, match="--to diffusers"):
        convert([str(original), str(tmp_path / "k.safetensors"), "--to", "kohya"])


def test_presets_name_the_transformer_layers(dit_paths):
    from peftkit.common_kernels.inject import find_targets
    from peftkit.common_kernels.lora import LoRAConfig

    base = load_base(str(dit_paths["flux"]))

    def targets(preset):
        return set(find_targets(base.unet, LoRAConfig(targets=dit.DIT_PRESETS[preset])))

    attn, ff, every = targets("attn"), targets("ff"), targets("all-linear")
    double = "transformer_blocks.0."
    assert {double + "attn.to_q", double + "attn.add_k_proj", double + "attn.to_add_out"} <= attn
    assert "single_transformer_blocks.0.attn.to_v" in attn
    assert {double + "ff_context.net.2", "single_transformer_blocks.0.proj_mlp"} <= ff
    assert attn | ff < every and double + "norm1.linear" in every
    assert not any(n.startswith(("x_embedder", "proj_out", "time_text")) for n in every)


def test_train_concepts_routes_flux_jobs_each_as_trained_alone(dit_paths, tmp_path):
    jobs_file = tmp_path / "jobs.yaml"
    images = tmp_path / "images"
    from .conftest import write_concept_images

    folders = [write_concept_images(images / f"c{i}", count=3, seed=i) for i in range(2)]
    jobs_file.write_text(f"""
model: {dit_paths["flux"]}
output: out
defaults: {{resolution: 16, rank: 4, lr: 1e-2, targets: [all-linear]}}
jobs:
  - {{name: a, images: {folders[0]}, prompt: a photo of sksa toy, steps: 4, seed: 0}}
  - {{name: b, images: {folders[1]}, prompt: a photo of sksb toy, steps: 3, batch_size: 2,
      seed: 1, weighting_scheme: logit_normal}}
""")
    assert train_concepts(["--jobs", str(jobs_file), "--no-progress"]) == 0
    for job in load_jobs(jobs_file).jobs:
        alone = tmp_path / "alone" / job.name
        job.train.output_dir = str(alone)
        train_concept(load_base(str(dit_paths["flux"])), job.images, job.concept, job.train)
        together = read_tensors(tmp_path / "out" / job.name / UNET_FILE)[0]
        reference = read_tensors(alone / UNET_FILE)[0]
        assert together.keys() == reference.keys()
        for key, value in reference.items():
            err = float((together[key] - value).norm() / value.norm())
            assert err < 5e-4, (job.name, key, err)


def test_an_unsupported_family_is_named_with_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(PeftkitError) as err:
        load_base(str(tmp_path))
    message = str(err.value)
    assert "KandinskyPipeline" in message
    assert all(name in message for name in ("StableDiffusion3Pipeline", "FluxPipeline"))


def test_xformers_is_refused_for_transformers(dit_paths):
    with pytest.raises(PeftkitError, match="sdpa"):
        load_base(str(dit_paths["flux"]), attention="xformers")


def test_train_concept_command_trains_an_sd3_adapter_with_a_weighting_scheme(
    dit_paths, concept_dir, tmp_path
):
    from peftkit.diffusion.cli import generate, train_concept

    out = tmp_path / "oft"
    argv = ["--model", str(dit_paths["sd3"]), "--images", str(concept_dir), "--output", str(out)]
    argv += ["--prompt", "a photo of sks toy", "--method", "oft", "--block-size", "8"]
    argv += ["--targets", "attn,ff", "--weighting-scheme", "cosmap", "--resolution", "16"]
    assert train_concept([*argv, "--steps", "2", "--no-progress", "--cpu"]) == 0
    assert json.loads((out / "concept.json").read_text())["weighting_scheme"] == "cosmap"
    samples = tmp_path / "samples"
    argv = ["--model", str(dit_paths["sd3"]), "--adapter", str(out), "--prompt", "sks toy"]
    argv += ["--output", str(samples), "--steps", "2", "--resolution", "16"]
    assert generate([*argv, "--cpu"]) == 0
    assert (samples / "p0-s0.png").is_file()
