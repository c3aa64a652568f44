"""DreamBooth on the tiny pipeline: the loss drops for every core, resume matches an uninterrupted run,
prior preservation, text-encoder LoRA, and the objective's math."""

import json
from types import SimpleNamespace

import pytest
import torch

from peftkit.common_kernels.adapter_file import load_adapter, read_tensors
from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.training.engine import TrainConfig, train
from peftkit.diffusion.base import load_base
from peftkit.diffusion.data import ConceptDataset
from peftkit.diffusion.dreambooth import UNET_FILE, ConceptConfig, ConceptTask, train_concept
from peftkit.diffusion.objective import min_snr_weights, snr


def _config(**kw):
    defaults = {
        "instance_prompt": "a photo of sks toy",
        "resolution": 16,
        "rank": 4,
        "block_size": 8,
    }
    return ConceptConfig(**{**defaults, **kw})


def _run(tiny_sd_path, concept_dir, out=None, steps=6, **kw):
    tc = TrainConfig(
        **{
            "steps": steps,
            "batch_size": 2,
            "lr": 1e-2,
            "progress": False,
            "schedule": "constant",
            "output_dir": str(out) if out else None,
            **kw.pop("train", {}),
        }
    )
    return train_concept(load_base(str(tiny_sd_path)), concept_dir, _config(**kw), tc)


@pytest.mark.parametrize(
    "method,lr,gain",
    [
        ("lora", 3e-2, 0.9),
        ("kron", 3e-2, 1.0),
        ("oft", 1e-1, 1.0),
        ("dora", 3e-2, 0.9),
        ("loha", 3e-2, 1.0),
        ("boft", 1e-1, 1.0),
    ],
)
def test_training_lowers_the_instance_loss(tiny_sd_path, concept_dir, method, lr, gain):
    base = load_base(str(tiny_sd_path))
    task = ConceptTask(
        base, ConceptDataset(concept_dir, "a photo of sks toy", 16), _config(method=method)
    )
    result = train(
        task,
        task.dataset(),
        TrainConfig(steps=10, batch_size=4, lr=lr, progress=False, schedule="constant"),
    )
    trained = task.fixed_loss()
    task.unet_handle.disable()
    untrained = task.fixed_loss()
    task.unet_handle.enable()
    assert result.metrics["instance_loss"] == pytest.approx(trained)
    assert trained < gain * untrained, (method, trained, untrained)


def test_saved_adapter_reloads_to_the_same_unet_output(tiny_sd_path, concept_dir, tmp_path):
    task, _ = _run(tiny_sd_path, concept_dir, tmp_path, steps=3)
    assert (tmp_path / "concept.json").is_file()
    fresh = load_base(str(tiny_sd_path))
    load_adapter(fresh.unet, tmp_path / UNET_FILE)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    hidden, _ = fresh.encode_prompt(["sks"])
    with torch.no_grad():
        ours = task.base.unet(x, t, encoder_hidden_states=hidden).sample
        theirs = fresh.unet(x, t, encoder_hidden_states=hidden).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd_path, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        plain = pipe.unet(x, t, encoder_hidden_states=hidden).sample
    assert (plain - ours).norm() / ours.norm() < 1e-5


def test_killed_run_resumes_to_the_uninterrupted_adapter(tiny_sd_path, concept_dir, tmp_path):
    kw = {"class_prompt": None, "offset_noise": 0.1, "min_snr_gamma": 5.0}
    _run(tiny_sd_path, concept_dir, tmp_path / "whole", steps=6, **kw)
    _run(tiny_sd_path, concept_dir, tmp_path / "cut", steps=3, train={"checkpoint_every": 3}, **kw)
    _, result = _run(
        tiny_sd_path, concept_dir, tmp_path / "cut", steps=6, train={"checkpoint_every": 3}, **kw
    )
    assert result.resumed_from == 3
    whole, _ = read_tensors(tmp_path / "whole" / UNET_FILE)
    cut, _ = read_tensors(tmp_path / "cut" / UNET_FILE)
    assert whole.keys() == cut.keys()
    for key in whole:
        torch.testing.assert_close(cut[key], whole[key], rtol=1e-5, atol=1e-7)


def test_prior_preservation_generates_caches_and_reuses_class_images(
    tiny_sd_path, concept_dir, tmp_path
):
    kw = {
        "class_prompt": "a photo of toy",
        "num_class_images": 2,
        "text_encoder_rank": 2,
        "gradient_checkpointing": True,
        "validation_prompts": ["sks toy"],
        "validation_every": 2,
        "validation_steps": 2,
    }
    task, result = _run(tiny_sd_path, concept_dir, tmp_path, steps=2, **kw)
    class_dir = tmp_path / "class_images"
    stamp = {p.name: p.stat().st_mtime_ns for p in class_dir.glob("*.png")}
    assert len(stamp) == 2
    assert (
        json.loads((class_dir / "peftkit_class_images.json").read_text())["prompt"]
        == "a photo of toy"
    )
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in task.trainable_parameters())
    assert len(task.text_handles) == 1 and (tmp_path / "text_encoder_adapter.safetensors").is_file()
    assert len(list((tmp_path / "validation" / "step-0000002").glob("*.png"))) == 1
    _run(tiny_sd_path, concept_dir, tmp_path, steps=4, **kw)
    assert {p.name: p.stat().st_mtime_ns for p in class_dir.glob("*.png")} == stamp


def test_unknown_target_module_names_the_presets(tiny_sd_path, concept_dir):
    base = load_base(str(tiny_sd_path))
    with pytest.raises(PeftkitError, match="presets"):
        ConceptTask(base, ConceptDataset(concept_dir, "x", 16), _config(targets=["no_such_proj"]))


def test_concept_steps_are_capturable_unless_a_feature_works_on_the_host(tiny_sd_path, concept_dir):
    # The noise is drawn eagerly (task.draw) and only drawn_loss is captured, so a plain concept
    # run takes the graphed path on a GPU; features that need the host each step say which.
    base = load_base(str(tiny_sd_path))
    data = ConceptDataset(concept_dir, "x", 16)
    assert ConceptTask(base, data, _config(), name="plain").graph_unsafe is None
    # token ids are gathered on the device, so a step that encodes text is capturable too
    assert ConceptTask(base, data, _config(text_encoder_rank=2), name="text").graph_unsafe is None
    checkpointed = ConceptTask(base, data, _config(gradient_checkpointing=True), name="ckpt")
    assert checkpointed.graph_unsafe is None  # no dropout: recomputation needs no RNG state
    base.unet.extra = torch.nn.Dropout(0.1)
    assert "gradient checkpointing" in checkpointed.graph_unsafe
    with pytest.raises(PeftkitError, match="cuda_graph=True needs a CUDA device"):
        _run(tiny_sd_path, concept_dir, steps=1, train={"cuda_graph": True, "cpu": True})


def test_drawn_loss_of_the_drawn_rows_is_the_step_loss(tiny_sd_path, concept_dir):
    base = load_base(str(tiny_sd_path))
    task = ConceptTask(base, ConceptDataset(concept_dir, "x", 16), _config(), seed=3)
    task.prepare(
        SimpleNamespace(
            device=torch.device("cpu"), mixed_precision="no", process_index=0, num_processes=1
        )
    )
    batch = {"instance": torch.tensor([0, 1]), "class": torch.tensor([0, 0])}
    state = task.stream.state
    with torch.no_grad():
        whole = task.loss(task.model, batch)
        task.stream.state = state
        split = task.drawn_loss(task.model, task.draw(batch))
    assert torch.equal(whole, split) and whole > 0


def test_nan_loss_stops_with_a_message_and_keeps_saved_checkpoints(
    tiny_sd_path, concept_dir, tmp_path
):
    base = load_base(str(tiny_sd_path))
    task = ConceptTask(base, ConceptDataset(concept_dir, "x", 16), _config())
    config = TrainConfig(
        steps=3, batch_size=2, progress=False, output_dir=str(tmp_path), checkpoint_every=1
    )
    train(task, task.dataset(), config)
    good = sorted((tmp_path / "checkpoints").glob("step-*"))
    task.score = lambda rows, pred: pred.sum() * float("nan")
    with pytest.raises(PeftkitError, match="NaN"):
        train(task, task.dataset(), TrainConfig(**{**config.__dict__, "steps": 6}))
    assert all(p.is_dir() for p in good[-1:])


def test_min_snr_weights_follow_the_paper():
    alphas = torch.tensor([0.99, 0.5, 0.01])
    s = snr(alphas, torch.arange(3))
    torch.testing.assert_close(s, torch.tensor([99.0, 1.0, 0.01 / 0.99]))
    torch.testing.assert_close(
        min_snr_weights(s, 5.0, "epsilon"), torch.tensor([5.0 / 99.0, 1.0, 1.0])
    )
    torch.testing.assert_close(
        min_snr_weights(s, 5.0, "v_prediction"), torch.clamp(s, max=5.0) / (s + 1)
    )


def test_config_round_trips_through_json():
    config = _config(targets=["attn", "ff"], text_encoder_rank=2, class_prompt="a toy")
    assert ConceptConfig.from_json(config.to_json()) == config
    with pytest.raises(PeftkitError, match="unknown adapter core .nope."):
        _config(method="nope")


def test_sdxl_concept_trains_with_pooled_and_size_conditioning(
    tiny_sdxl_path, concept_dir, tmp_path
):
    base = load_base(str(tiny_sdxl_path))
    assert base.kind == "sdxl"
    hidden, extra = base.encode_prompt(["sks toy"], resolution=16)
    assert (
        hidden.shape == (1, 16, 64)
        and extra["text_embeds"].shape == (1, 32)
        and extra["time_ids"].shape == (1, 6)
    )
    task, result = train_concept(
        base,
        concept_dir,
        _config(text_encoder_rank=2),
        TrainConfig(steps=2, batch_size=2, lr=1e-2, progress=False, output_dir=str(tmp_path)),
    )
    assert len(task.text_handles) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert (tmp_path / "text_encoder_2_adapter.safetensors").is_file()


def test_resuming_with_another_rank_names_the_changed_setting(tiny_sd_path, concept_dir, tmp_path):
    _run(tiny_sd_path, concept_dir, tmp_path, steps=1, train={"checkpoint_every": 1})
    with pytest.raises(PeftkitError, match=r"trained with other settings: rank 4 -> 8;") as err:
        _run(tiny_sd_path, concept_dir, tmp_path, steps=2, rank=8)
    assert "another base model" not in str(err.value)


def test_cached_encoders_are_the_vae_and_the_text_encoders_without_a_lora(
    tiny_sd_path, concept_dir
):
    # These leave the GPU once latents and embeddings are cached (prepare on a CUDA device).
    base = load_base(str(tiny_sd_path))
    data = ConceptDataset(concept_dir, "x", 16)
    plain = ConceptTask(base, data, _config(), name="plain")
    assert plain.encoders() == [base.vae, *base.text_encoders]
    text = ConceptTask(base, data, _config(text_encoder_rank=2), name="text")
    assert text.encoders() == [base.vae]


def test_checkpointed_steps_give_the_gradients_of_plain_steps(tiny_sd_path, concept_dir):
    grads = []
    for checkpointing in (False, True):
        base = load_base(str(tiny_sd_path))
        task = ConceptTask(
            base,
            ConceptDataset(concept_dir, "x", 16),
            _config(gradient_checkpointing=checkpointing),
            seed=5,
        )
        task.prepare(
            SimpleNamespace(
                device=torch.device("cpu"), mixed_precision="no", process_index=0, num_processes=1
            )
        )
        task.model.train()
        task.loss(
            task.model, {"instance": torch.tensor([0, 1]), "class": torch.zeros(0)}
        ).backward()
        grads.append(torch.cat([p.grad.flatten() for p in task.trainable_parameters()]))
    assert base.unet.is_gradient_checkpointing
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0
