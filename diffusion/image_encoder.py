"""The frozen image tower of an IP-Adapter: CLIP vision (transformers) or an open_clip visual tower."""

from __future__ import annotations

import torch

from ..common_kernels.errors import PeftkitError


class ImageEncoder:
    """The frozen image tower: a transformers `CLIPVisionModelWithProjection` (folder or hub id; the
    model diffusers pairs with IP-Adapters) or `open_clip:<architecture>[:<pretrained tag or file>]`.
    "basic" reads the pooled, projected embedding; "plus" the penultimate layer's tokens (CLIP only).

        >>> encoder = ImageEncoder("openai/clip-vit-large-patch14", "basic")   # doctest: +SKIP
        >>> encoder.encode([image]).shape                                       # doctest: +SKIP
        torch.Size([1, 768])
    """

    def __init__(
        self, source: str, variant: str = "basic", device: str | torch.device = "cpu"
    ) -> None:
        if not source:
            raise PeftkitError(
                "no image encoder given: pass --image-encoder with a CLIP vision model folder or hub "
                "id, or open_clip:<architecture>:<pretrained>"
            )
        self.source, self.variant, self.device = source, variant, torch.device(device)
        if source.startswith("open_clip:"):
            if variant == "plus":
                raise PeftkitError(
                    "the plus variant reads CLIP patch tokens: use a transformers CLIP vision model "
                    "as image encoder, or the basic variant with open_clip"
                )
            import open_clip

            _, arch, *tag = source.split(":", 2)
            model, _, self.preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=tag[0] if tag else None
            )
            self.model = model.eval().to(self.device)
            self.embed_dim = model.visual.output_dim
        else:
            from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

            self.model = (
                CLIPVisionModelWithProjection.from_pretrained(source).eval().to(self.device)
            )
            try:
                self.processor = CLIPImageProcessor.from_pretrained(source)
            except (
                OSError
            ):  # a bare model folder: CLIP's standard preprocessing at the model's size
                size = self.model.config.image_size
                self.processor = CLIPImageProcessor(
                    size={"shortest_edge": size}, crop_size={"height": size, "width": size}
                )
            cfg = self.model.config
            self.embed_dim = cfg.projection_dim if variant == "basic" else cfg.hidden_size
        self.model.requires_grad_(False)

    def to(self, device: str | torch.device) -> ImageEncoder:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def pixels(self, images: list) -> torch.Tensor:
        if hasattr(self, "processor"):
            return self.processor(
                images=[im.convert("RGB") for im in images], return_tensors="pt"
            ).pixel_values
        return torch.stack([self.preprocess(im.convert("RGB")) for im in images])

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, next(self.model.parameters()).dtype)
        if hasattr(self, "processor"):
            out = self.model(pixels, output_hidden_states=self.variant == "plus")
            return (out.image_embeds if self.variant == "basic" else out.hidden_states[-2]).float()
        return self.model.encode_image(pixels).float()

    def encode(self, images: list) -> torch.Tensor:
        return self.encode_pixels(self.pixels(images))

    def negative(self) -> torch.Tensor:
        """The embedding of "no image" (batch of 1), as diffusers builds it for guidance: zeros for the
        pooled embedding, the tokens of an all-zero input for the resampler."""
        if self.variant == "basic":
            return torch.zeros(1, self.embed_dim, device=self.device)
        size = self.model.config.image_size
        return self.encode_pixels(torch.zeros(1, 3, size, size))
