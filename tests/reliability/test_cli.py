"""Every bad value the issue lists, and more, through `peftkit`'s dispatcher: exit code 2, one error
line naming the flag or the problem, never a traceback (unless --debug)."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from peftkit.apps import cli
from peftkit.apps.cli import main


def _run(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own exit, as the console script would see it
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "a-file").write_text("x")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(images / "a.png")
    return {"file": str(tmp_path / "a-file"), "images": str(images), "out": str(tmp_path / "out")}


GEN = ["generate", "--model", "starter", "--prompt", "x"]
TRAIN = ["train-concept", "--model", "starter", "--prompt", "sks"]
VIT = ["vit-train", "--data", "builtin:shape", "--random-init"]

BAD_FLAGS = [
    (GEN + ["--output", "{out}", "--steps", "0"], "--steps"),
    (GEN + ["--output", "{out}", "--steps", "-1"], "--steps"),
    (GEN + ["--output", "{out}", "--resolution", "63"], "--resolution"),
    (GEN + ["--output", "{file}"], "--output"),
    (GEN + ["--output", "{file}/sub"], "--output"),
    (GEN + ["--output", "{out}", "--guidance", "nan"], "--guidance"),
    (GEN + ["--output", "{out}", "--ip-image", "{out}/none.png"], "--ip-image"),
    (TRAIN + ["--images", "{images}", "--output", "{out}", "--steps", "ten"], "--steps"),
    (TRAIN + ["--images", "{images}", "--output", "{out}", "--rank", "0"], "--rank"),
    (TRAIN + ["--images", "{images}", "--output", "{out}", "--lr", "inf"], "--lr"),
    (TRAIN + ["--images", "{out}/missing", "--output", "{out}"], "--images"),
    (
        [
            "train-ti",
            "--model",
            "s",
            "--images",
            "{images}",
            "--output",
            "{out}",
            "--token",
            "<t>",
            "--init-word",
            "t",
            "--num-vectors",
            "0",
        ],
        "--num-vectors",
    ),  # fmt: skip
    (
        [
            "evaluate-concept",
            "--generated",
            "{out}",
            "--references",
            "{images}",
            "--clip-model",
            "c",
        ],
        "--generated",
    ),  # fmt: skip
    (["convert", "{out}/none.safetensors", "{out}/o.safetensors", "--to", "kohya"], "input"),
    (
        ["train-control", "--model", "m", "--data", "d", "--output", "{out}", "--resolution", "63"],
        "--resolution",
    ),  # fmt: skip
    (
        [
            "train-ip-adapter",
            "--model",
            "m",
            "--data",
            "d",
            "--output",
            "{out}",
            "--image-encoder",
            "e",
            "--drop",
            "-0.5",
        ],
        "--drop",
    ),  # fmt: skip
    (["train-concepts", "--jobs", "{out}/jobs.yaml"], "--jobs"),
    (VIT + ["--batch-size", "0"], "--batch-size"),
    (VIT + ["--epochs", "-3"], "--epochs"),
    (["vit-eval", "--adapter", "{out}/a.safetensors", "--data", "builtin:shape"], "--adapter"),
    (["serve", "--base", "b", "--adapters", "{images}", "--max-steps", "0"], "--max-steps"),
    (["serve", "--base", "b", "--adapters", "{images}", "--port", "-1"], "--port"),
]


@pytest.mark.parametrize("argv,flag", BAD_FLAGS, ids=[" ".join(a[:1] + [f]) for a, f in BAD_FLAGS])
def test_a_bad_flag_value_fails_at_parse_time_with_one_line_naming_it(argv, flag, paths, capsys):
    code, err = _run([a.format(**paths) for a in argv], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"error: argument {flag}" in err and err.strip().endswith("--help')")


def test_convert_names_the_missing_half_of_a_lora_pair(tmp_path, capsys):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": torch.zeros(2, 32)}, tmp_path / "half.safetensors")
    code, err = _run(
        ["convert", str(tmp_path / "half.safetensors"), str(tmp_path / "o"), "--to", "diffusers"],
        capsys,
    )
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "lora_up" in err and "incomplete" in err


def test_an_unreadable_clip_checkpoint_is_a_message(tmp_path, paths, capsys):
    import open_clip

    configs = tmp_path / "configs"
    configs.mkdir()
    tiny = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2},
    }
    (configs / "reliability-tiny-clip.json").write_text(json.dumps(tiny))
    open_clip.add_model_config(configs)
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint" * 8)
    argv = ["evaluate-concept", "--generated", paths["images"], "--references", paths["images"]]
    argv += ["--prompt", "p", "--clip-model", "reliability-tiny-clip"]
    code, err = _run(argv + ["--clip-pretrained", str(tmp_path / "x.pt")], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "cannot load open_clip model" in err


def test_os_errors_are_one_line_and_unexpected_ones_point_to_debug(monkeypatch, capsys):
    def denied(argv):
        raise PermissionError(13, "Permission denied", "/srv/out")

    monkeypatch.setattr(cli, "info", denied)
    code, err = _run(["info"], capsys)
    assert code == 2 and err.strip() == (
        "peftkit info: error: Permission denied '/srv/out': check the path and its permissions"
    )

    def broken(argv):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "info", broken)
    code, err = _run(["info"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "ZeroDivisionError" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "info"])
