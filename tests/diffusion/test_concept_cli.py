"""The four commands end to end on the tiny pipeline: train-concept, train-ti, generate, evaluate-concept."""

import gc
import json

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
