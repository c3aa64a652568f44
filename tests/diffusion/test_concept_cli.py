"""The four commands end to end on the tiny pipeline: train-concept, train-ti, generate, evaluate-concept."""

import gc
import json

import torch

from peftkit.apps.cli import main
from peftkit.diffusion.cli import evaluate_concept, generate, train_concept, train_ti


def test_train_generate_evaluate(tiny_sd_path, concept_dir, clip_dir, tmp_path):
    common = [
        "--model",
        str(tiny_sd_path),
        "--images",
        str(concept_dir),
        "--resolution",
        "16",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--no-progress",
        "--cpu",
    ]
    assert (
        train_concept(
            [
                *common,
                "--prompt",
                "a photo of sks toy",
                "--output",
                str(tmp_path / "dog"),
                "--method",
                "kron",
                "--targets",
                "attn,ff",
                "--min-snr-gamma",
                "5",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "dog" / "train.json").read_text())["steps"] == 2
    assert gc.isenabled() and gc.get_freeze_count() == 0  # the set-up's collector pause is over
    assert (
        train_ti(
            [*common, "--token", "<toy>", "--init-word", "toy", "--output", str(tmp_path / "ti")]
        )
        == 0
    )
    assert (tmp_path / "ti" / "learned_embeds.safetensors").is_file()

    out = tmp_path / "samples"
    assert (
        generate(
            [
                "--model",
                str(tiny_sd_path),
                "--adapter",
                f"{tmp_path / 'dog'}:0.7",
                "--adapter",
                str(tmp_path / "ti" / "learned_embeds.safetensors"),
                "--prompt",
                "sks toy",
                "--prompt",
                "a <toy>",
                "--seeds",
                "0,1",
                "--steps",
                "2",
                "--resolution",
                "16",
                "--cpu",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert len(list(out.glob("p*.png"))) == 4 and (out / "grid.png").is_file()
    scores = tmp_path / "scores.json"
    assert (
        evaluate_concept(
            [
                "--generated",
                str(out),
                "--references",
                str(concept_dir),
                "--clip-model",
                str(clip_dir),
                "--output",
                str(scores),
            ]
        )
        == 0
    )
    assert set(json.loads(scores.read_text())) == {"clip_i", "clip_t"}


def test_user_errors_exit_with_a_message(tiny_sd_path, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(
        [
            "train-concept",
            "--model",
            str(tiny_sd_path),
            "--images",
            str(tmp_path / "empty"),
            "--prompt",
            "sks",
            "--output",
            str(tmp_path / "o"),
            "--resolution",
            "16",
            "--steps",
            "1",
            "--cpu",
        ]
    )
    assert code == 2 and "no images found" in capsys.readouterr().err
    code = main(
        [
            "generate",
            "--model",
            str(tiny_sd_path),
            "--prompt",
            "x",
            "--seeds",
            "a",
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 2 and "--seeds" in capsys.readouterr().err


def test_train_ti_in_bf16_keeps_the_text_encoder_and_rows_fp32(
    tiny_sd_path, concept_dir, tmp_path, monkeypatch
):
    """The frozen UNet and VAE load in the run's half precision; the text encoder the rows train
    through, and the rows themselves, stay fp32; the run trains and saves fp32 embeddings."""
    from peftkit.common_kernels.adapter_file import read_tensors
    from peftkit.diffusion import base as base_module

    loaded, load = [], base_module.load_base
    monkeypatch.setattr(
        base_module, "load_base", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1]
    )

    out = tmp_path / "ti-bf16"
    args = ["--model", str(tiny_sd_path), "--images", str(concept_dir), "--steps", "2"]
    args += ["--resolution", "16", "--cpu", "--mixed-precision", "bf16", "--token", "<toy>"]
    assert train_ti([*args, "--init-word", "toy", "--output", str(out)]) == 0
    tensors = read_tensors(out / "learned_embeds.safetensors")[0]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    summary = json.loads((out / "train.json").read_text())
    assert summary["steps"] == 2 and summary["final_loss"] > 0
    pipe = loaded[0].pipe
    assert pipe.unet.dtype == pipe.vae.dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == torch.float32
