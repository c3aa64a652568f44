"""DreamBooth metrics (Ruiz et al. 2023, sec. 4.1): subject fidelity as the mean pairwise cosine
similarity between generated and real instance images, in CLIP image space (CLIP-I) and in a
self-supervised ViT's space (DINO); prompt fidelity as the mean cosine similarity between each
generated image and its prompt in CLIP space (CLIP-T).

    clip = ClipEmbedder("ViT-B-32", pretrained="/models/clip-b32.safetensors")   # or "local-dir:/models/clip"
    scores = concept_scores(generated, prompts, references, clip, dino=DinoEmbedder("/models/dino-vits16"))
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..common_kernels.errors import PeftkitError


class ClipEmbedder:
    """An open_clip model: `model` is an open_clip name ("ViT-B-32") with `pretrained` a tag or a
    local checkpoint file, or a folder holding open_clip_config.json and weights ("local-dir:")."""

    def __init__(
        self, model: str, pretrained: str | None = None, device: str | torch.device = "cpu"
    ) -> None:
        import open_clip

        name = f"local-dir:{model}" if Path(model).is_dir() else model
        if pretrained and Path(pretrained).is_file() and Path(pretrained).suffix != ".safetensors":
            # Weights load through safetensors only: a pickled checkpoint can run code.
            raise PeftkitError(
                f"cannot load open_clip model {model!r} from {pretrained!r}: only .safetensors "
                "checkpoints are read; convert it (safetensors.torch.save_file) or pass a folder "
                "with open_clip_config.json"
            )
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device
            )
            self.tokenizer = open_clip.get_tokenizer(name)
        except (RuntimeError, OSError, ValueError, EOFError) as err:
            why = (str(err).strip().splitlines() or [type(err).__name__])[0]  # torch's run long
            raise PeftkitError(
                f"cannot load open_clip model {model!r} (pretrained={pretrained!r}): {why}; pass a "
                "local checkpoint with --clip-pretrained /path/model.safetensors or a folder with "
                "open_clip_config.json"
            ) from None
        self.model.eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(
            self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1
        )


class DinoEmbedder:
    """A ViT from a transformers folder or hub id (e.g. facebook/dino-vits16); features are the
    final [CLS] token, as in the DreamBooth paper's DINO metric."""

    def __init__(self, model: str, device: str | torch.device = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModel

        try:
            self.processor = AutoImageProcessor.from_pretrained(model)
            self.model = AutoModel.from_pretrained(model).to(device).eval()
        except (OSError, ValueError) as err:
            raise PeftkitError(
                f"cannot load DINO model {model!r} ({err}): pass a local transformers folder "
                "(config.json, weights, preprocessor_config.json)"
            ) from None
        self.device = torch.device(device)

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.processor(
            images=[im.convert("RGB") for im in images], return_tensors="pt"
        ).to(self.device)
        return F.normalize(self.model(**inputs).last_hidden_state[:, 0].float(), dim=-1)


def pairwise_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of rows of two L2-normalized feature sets."""
    return float((a @ b.T).mean())


def concept_scores(
    generated: list[Image.Image],
    prompts: list[str],
    references: list[Image.Image],
    clip: ClipEmbedder,
    dino: DinoEmbedder | None = None,
) -> dict[str, float]:
    """{"clip_i", "clip_t", and "dino" when a DINO model is given}; prompts[i] is generated[i]'s prompt."""
    if not generated or not references:
        raise PeftkitError("concept metrics need at least one generated and one reference image")
    if len(prompts) != len(generated):
        raise PeftkitError(
            f"{len(generated)} generated images but {len(prompts)} prompts: give one prompt per image"
        )
    gen = clip.images(generated)
    scores = {
        "clip_i": pairwise_similarity(gen, clip.images(references)),
        "clip_t": float((gen * clip.texts(prompts)).sum(-1).mean()),
    }
    if dino is not None:
        scores["dino"] = pairwise_similarity(dino.images(generated), dino.images(references))
    return scores
