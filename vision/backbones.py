"""ViT backbones and where adapters attach to them.

Three families: timm `VisionTransformer` (vit_*, deit_*, DINOv2's vit_*_dinov2, timm's CLIP ViTs),
timm `SwinTransformer` (swin_*, see backbone_swin.py) and the visual tower of open_clip.
`vit_layout(model)` describes each in the same terms (embedding width, patch size, blocks, and the
dotted names of the sites qkv / proj / fc1 / fc2 / norm1 / norm2 / mlp inside each block), so every
method is written once; methods a layout cannot take are listed in `ViTLayout.unsupported`.

open_clip towers get their `nn.MultiheadAttention` split into Linear qkv / proj layers with the
same weights (backbone_clip.py), so every method reaches the same sites as on a timm ViT.

    >>> model = create_backbone("vit_tiny_patch16_224", num_classes=10, pretrained=False)  # doctest: +SKIP
    >>> model = create_backbone("starter", num_classes=4, pretrained=True)  # assets/starter-vit  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.hub import hub_reachable, unreachable_message

# The starter ViT pretrained by assets/recipes/train_starter_vit.py: config.json + model.safetensors.
STARTER_VIT = Path(__file__).resolve().parent.parent / "assets" / "starter-vit"
BLOCK_SITES = ("qkv", "proj", "fc1", "fc2", "norm1", "norm2", "mlp")
_TIMM_SITES = {
    "qkv": "attn.qkv",
    "proj": "attn.proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
    "norm1": "norm1",
    "norm2": "norm2",
    "mlp": "mlp",
}
_CLIP_SITES = {
    "fc1": "mlp.c_fc",
    "fc2": "mlp.c_proj",
    "norm1": "ln_1",
    "norm2": "ln_2",
    "mlp": "mlp",
}
# open_clip's OPENAI_DATASET_MEAN/STD, the normalization its visual towers were trained with.
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ViTLayout:
    """Where things are in a ViT classifier; dotted names are relative to the classifier."""

    family: str  # "timm" | "open_clip"
    embed_dim: int
    patch_size: tuple[int, int]
    num_prefix_tokens: int  # [CLS] (+ register/distillation tokens) before the patches
    blocks: list[str]
    entry: str  # module whose output is the token sequence entering block 0
    exit: str  # module at the end of the token stack (see `exit_is_pre`)
    exit_is_pre: bool  # True: tokens are the *input* of `exit`; False: its output
    head: str
    block_sites: dict[str, str] = field(default_factory=dict)
    model_sites: dict[str, str] = field(default_factory=dict)  # "patch", "norm", "pre_norm"
    block_dims: list[int] = field(default_factory=list)  # token width per block (Swin: per stage)
    unsupported: dict[str, str] = field(default_factory=dict)  # method name -> why not here

    def width(self, block: int) -> int:
        return self.block_dims[block] if self.block_dims else self.embed_dim

    def check_methods(self, names: list[str]) -> None:
        """One line naming every method in `names` this backbone cannot take, and why."""
        bad = [n for n in names if n in self.unsupported]
        if bad:
            why = "; ".join(dict.fromkeys(self.unsupported[n] for n in bad))
            raise PeftkitError(
                f"{' and '.join(bad)} cannot be applied to this {self.family} backbone ({why}): "
                f"drop {'them' if len(bad) > 1 else 'it'} or use a plain ViT"
            )

    def site_names(self, site: str) -> list[str]:
        """Dotted names of `site` in every block (or the one model-level module)."""
        if site in self.model_sites:
            return [self.model_sites[site]]
        if site not in self.block_sites:
            allowed = sorted(set(self.block_sites) | set(self.model_sites))
            why = (
                " (open_clip's nn.MultiheadAttention calls its weights directly, so qkv/proj cannot be hooked)"
                if self.family == "open_clip" and site in ("qkv", "proj")
                else ""
            )
            raise PeftkitError(
                f"site {site!r} does not exist on this {self.family} ViT{why}: use any of {allowed}"
            )
        return [f"{b}.{self.block_sites[site]}" for b in self.blocks]


def vit_layout(model: nn.Module) -> ViTLayout:
    """Describe a timm VisionTransformer / SwinTransformer or a `CLIPVisionClassifier`; a clear
    error for anything else."""
    import timm.models.swin_transformer as tswin
    import timm.models.vision_transformer as tvit

    if isinstance(model, tswin.SwinTransformer):
        from .backbone_swin import swin_layout

        return swin_layout(model)

    if isinstance(model, tvit.VisionTransformer):
        if model.attn_pool is not None:
            raise PeftkitError(
                "timm ViTs with attention pooling (global_pool='map') are not supported: "
                "create the model with global_pool='token' or 'avg'"
            )
        patch = tuple(model.patch_embed.patch_size)
        model_sites = {
            "patch": "patch_embed.proj",
            "norm": "norm" if not isinstance(model.norm, nn.Identity) else "fc_norm",
        }
        if not isinstance(model.norm_pre, nn.Identity):
            model_sites["pre_norm"] = "norm_pre"
        return ViTLayout(
            "timm",
            model.embed_dim,
            patch,
            model.num_prefix_tokens,
            [f"blocks.{i}" for i in range(len(model.blocks))],
            "norm_pre",
            "norm",
            True,
            "head",
            dict(_TIMM_SITES),
            model_sites,
        )
    if isinstance(model, CLIPVisionClassifier):
        from .backbone_clip import has_split_attention

        v = model.visual
        sites = {**_CLIP_SITES, "qkv": "attn.qkv", "proj": "attn.proj"}
        blocks = [f"visual.transformer.resblocks.{i}" for i in range(len(v.transformer.resblocks))]
        model_sites = {"patch": "visual.conv1", "norm": "visual.ln_post"}
        if not isinstance(v.ln_pre, nn.Identity):
            model_sites["pre_norm"] = "visual.ln_pre"
        return ViTLayout(
            "open_clip",
            v.conv1.out_channels,
            tuple(v.patch_size),
            1,
            blocks,
            "visual.ln_pre",
            "visual.transformer",
            False,
            "head",
            sites if has_split_attention(v) else dict(_CLIP_SITES),
            model_sites,
        )
    raise PeftkitError(
        f"{type(model).__name__} is not a supported ViT: use a timm VisionTransformer "
        "(vit_*, deit_*, vit_*_dinov2), a timm SwinTransformer (swin_*) or an open_clip visual "
        "tower wrapped by create_backbone(open_clip=...)"
    )


class CLIPVisionClassifier(nn.Module):
    """An open_clip visual tower with a linear classification head on its pooled (projected) output;
    its attention is split into qkv / proj Linear layers (backbone_clip.py)."""

    def __init__(self, visual: nn.Module, num_classes: int) -> None:
        from .backbone_clip import split_attention

        super().__init__()
        split_attention(visual)
        self.visual = visual
        width = (
            visual.output_dim
            if getattr(visual, "proj", None) is not None
            else visual.conv1.out_channels
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(x))


def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone's weights expect."""
    if isinstance(model, CLIPVisionClassifier):
        return tuple(getattr(model.visual, "image_mean", None) or _CLIP_MEAN), tuple(
            getattr(model.visual, "image_std", None) or _CLIP_STD
        )
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(
        cfg.get("std", (0.229, 0.224, 0.225))
    )


def backbone_parameters(model: nn.Module) -> int:
    """Parameters of the plain ViT without its classification head (the '% of backbone' base)."""
    head = vit_layout(model).head
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if not n.startswith(head + ".") and not n.startswith("peftkit_")
    )


def create_backbone(
    name: str | None = None,
    num_classes: int = 1000,
    pretrained: bool = False,
    checkpoint: str | None = None,
    open_clip: str | None = None,
    open_clip_config: dict | None = None,
    **timm_kwargs,
) -> nn.Module:
    """A ViT classifier with a fresh `num_classes` head.

    timm: `name` with `pretrained=True` (downloads from the hub, or its cache offline),
    `checkpoint=<file.safetensors>` (local weights; a head of another size is dropped), or neither
    (random init); `name="hf-hub:<org>/<repo>"`: a timm model repository on the hub.
    `name="starter"`: the ViT in assets/starter-vit (its weights with `pretrained=True`, else the
    same architecture with random weights); `"starter:<folder>"`: a copy of it elsewhere.
    open_clip: `open_clip=<model name>` (with `pretrained=True`: its default tag; `checkpoint`: a
    local file), or `open_clip_config={...}` (VisionTransformer arguments, random init, no download).

        >>> m = create_backbone("vit_tiny_patch16_224", num_classes=5, img_size=32)  # doctest: +SKIP
    """
    if open_clip or open_clip_config:
        return _open_clip(open_clip, open_clip_config, num_classes, pretrained, checkpoint)
    if not name:
        raise PeftkitError(
            "no backbone given: pass a timm model name (e.g. vit_base_patch16_224) or open_clip=..."
        )
    if name == "starter" or name.startswith("starter:"):
        folder = Path(name.partition(":")[2]) if ":" in name else STARTER_VIT
        return _starter(folder, num_classes, pretrained, checkpoint, timm_kwargs)
    import timm

    if name.startswith("hf-hub:"):
        return _timm_hub_repo(
            name[len("hf-hub:") :], num_classes, pretrained, checkpoint, timm_kwargs
        )
    if not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise PeftkitError(f"timm has no model {name!r}: similar names are {close}")
    if checkpoint:
        return _timm_from_file(name, checkpoint, num_classes, timm_kwargs)
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **timm_kwargs)
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id or f"timm/{name}"
    if not hub_reachable():
        # timm would retry the hub for most of a minute; a cached copy still loads
        return _timm_from_file(name, _hub_file(repo, "model.safetensors"), num_classes, timm_kwargs)
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, **timm_kwargs)
    except Exception as err:  # hub errors come as OSError, HTTP, connection or hub-specific types
        raise PeftkitError(
            f"could not load pretrained weights for {name!r} from {repo!r} on the Hugging Face hub "
            f"({type(err).__name__}: {str(err)[:200]}); {_local_hint(repo)}"
        ) from None


def _timm_hub_repo(
    repo: str, num_classes: int, pretrained: bool, checkpoint: str | None, kwargs: dict
) -> nn.Module:
    """`hf-hub:<org>/<name>`: a timm model published as a hub repository, whose config.json names
    the architecture, its arguments and normalization; read from the hub cache when offline."""
    import timm

    config = json.loads(Path(_hub_file(repo, "config.json")).read_text())
    if "architecture" not in config:
        raise PeftkitError(
            f"{repo!r} is not a timm model repository: its config.json names no architecture"
        )
    name, args = config["architecture"], {**config.get("model_args", {}), **kwargs}
    cfg = config.get("pretrained_cfg", {})
    if not (pretrained or checkpoint):
        return timm.create_model(name, num_classes=num_classes, pretrained_cfg_overlay=cfg, **args)
    weights = checkpoint or _hub_file(repo, "model.safetensors")
    return _timm_from_file(name, weights, num_classes, args, cfg)


def _hub_file(repo: str, filename: str) -> str:
    """`filename` of hub repository `repo`: downloaded (or from the cache) when the hub answers,
    else from the cache, else the one-line offline message."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if hub_reachable():
        try:
            return hf_hub_download(repo, filename)
        except Exception as err:  # hub errors come as OSError, HTTP or hub-specific types
            raise PeftkitError(
                f"could not fetch {filename} of {repo!r} from the Hugging Face hub "
                f"({type(err).__name__}: {str(err)[:200]}); {_local_hint(repo)}"
            ) from None
    cached = try_to_load_from_cache(repo, filename)
    if not isinstance(cached, str):
        raise PeftkitError(unreachable_message(repo, filename, _local_hint(repo)))
    return cached


def _timm_from_file(
    name: str, path: str, num_classes: int, kwargs: dict, pretrained_cfg: dict | None = None
) -> nn.Module:
    """timm's own pretrained loading from a local file: its checkpoint filter resamples position
    embeddings to another input size and converts foreign layouts (DINOv2, OpenAI CLIP), and a
    head of another size is dropped for a fresh one."""
    import timm

    _require_safetensors(path)
    try:
        return timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay={**(pretrained_cfg or {}), "file": str(path), "source": "timm"},
            num_classes=num_classes,
            **kwargs,
        )
    except (RuntimeError, KeyError, ValueError) as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2])[:240]
        raise PeftkitError(
            f"checkpoint {path!r} does not fit timm model {name!r} ({detail}); check that the "
            "model name and --model-kwargs match the checkpoint"
        ) from None


def _require_safetensors(path: str) -> None:
    if Path(path).suffix != ".safetensors":
        raise PeftkitError(
            f"checkpoint {path!r} must be a .safetensors file (pickled .bin/.pth files are not "
            "loaded for safety): convert it with safetensors.torch.save_file"
        )


def _local_hint(repo: str) -> str:
    return (
        f"pass the weights with --checkpoint ./{repo.split('/')[-1]}/model.safetensors "
        "(Python: checkpoint=...), or use --model starter (the bundled ViT, no download), or "
        "train from scratch with --random-init"
    )


def _starter(
    folder: Path, num_classes: int, pretrained: bool, checkpoint: str | None, overrides: dict
) -> nn.Module:
    import timm

    config_file = folder / "config.json"
    if not config_file.is_file() or not (folder / "model.safetensors").is_file():
        raise PeftkitError(
            f"no starter ViT in {folder} (it needs config.json and model.safetensors): "
            "recreate it on a GPU with `python -m peftkit.assets.recipes.train_starter_vit`, or pass a "
            "timm model name such as vit_tiny_patch16_224"
        )
    config = json.loads(config_file.read_text())
    changed = sorted(
        k
        for k, v in overrides.items()
        if k in config["model_kwargs"] and config["model_kwargs"][k] != v
    )
    if changed:
        raise PeftkitError(
            f"the starter ViT's {changed} are fixed by its weights ({config['model_kwargs']}): drop "
            "them from the model kwargs"
        )
    model = timm.create_model(
        config["architecture"],
        pretrained=False,
        num_classes=num_classes,
        **{**config["model_kwargs"], **overrides},
    )
    # normalization() reads the mean/std the weights were trained with from here
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
    }
    if checkpoint or pretrained:
        _load_local(model, checkpoint or str(folder / "model.safetensors"), head="head")
    return model


def _open_clip(name, config, num_classes, pretrained, checkpoint) -> nn.Module:
    import open_clip as oc
    from open_clip.transformer import VisionTransformer

    if config:
        return CLIPVisionClassifier(VisionTransformer(**config), num_classes)
    if name not in oc.list_models():
        raise PeftkitError(
            f"open_clip has no model {name!r}: known names include {oc.list_models()[:8]}"
        )
    tag, quick_gelu = None, False
    if checkpoint:
        _require_safetensors(checkpoint)
    elif pretrained:
        tags = oc.list_pretrained_tags_by_model(name)
        tag = tags[0] if tags else None
        if tag and not hub_reachable():
            # open_clip would retry the hub for most of a minute; a cached copy still loads
            checkpoint, quick_gelu = _cached_open_clip(name, tag)
            tag = None
    try:
        clip = oc.create_model(name, pretrained=checkpoint or tag, force_quick_gelu=quick_gelu)
    except Exception as err:
        raise PeftkitError(
            f"could not load open_clip weights for {name!r} ({type(err).__name__}: {str(err)[:200]}): download "
            f"the checkpoint where the hub is reachable (open_clip tag {tag!r}) and pass it with --checkpoint "
            "path/to/open_clip_model.safetensors, or drop --pretrained to start from random weights"
        ) from None
    if not isinstance(clip.visual, VisionTransformer):
        raise PeftkitError(
            f"open_clip model {name!r} has a {type(clip.visual).__name__} image tower, not a ViT"
        )
    return CLIPVisionClassifier(clip.visual, num_classes)


def _cached_open_clip(name: str, tag: str) -> tuple[str, bool]:
    """The hub-cached safetensors of open_clip `name`/`tag` and whether its tag asks for QuickGELU
    (which a file path alone does not carry), or the offline message naming the repository."""
    import open_clip as oc
    from huggingface_hub import try_to_load_from_cache

    cfg = oc.get_pretrained_cfg(name, tag)
    parts = (cfg.get("hf_hub") or "").strip("/").split("/")  # "org/repo/" or "org/repo/file"
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or "open_clip_pytorch_model.bin"
    # open_clip itself prefers the safetensors twin of a .bin; peftkit reads only that one
    filename = (
        "open_clip_model.safetensors"
        if filename == "open_clip_pytorch_model.bin"
        else filename.rsplit(".", 1)[0] + ".safetensors"
    )
    if not repo:
        raise PeftkitError(
            f"open_clip {name}:{tag} downloads from {cfg.get('url')!r}, which is out of reach: "
            "fetch it elsewhere, save it as .safetensors and pass it with --checkpoint"
        )
    cached = try_to_load_from_cache(repo, filename)
    if not isinstance(cached, str):
        hint = (
            f"pass it with --checkpoint ./{repo.split('/')[-1]}/{filename} (Python: "
            "checkpoint=...), or use --model starter (the bundled ViT, no download)"
        )
        raise PeftkitError(unreachable_message(repo, filename, hint))
    return cached, bool(cfg.get("quick_gelu", False))


def _load_local(model: nn.Module, path: str, head: str) -> None:
    from peftkit.common_kernels.adapter_file import read_tensors

    _require_safetensors(path)
    state, _ = read_tensors(path)
    own = model.state_dict()
    # A checkpoint trained for another label set: keep the backbone, start a fresh head.
    state = {
        k: v
        for k, v in state.items()
        if not (k.startswith(head + ".") and own.get(k, v).shape != v.shape)
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        raise PeftkitError(
            f"checkpoint {path!r} does not fit this model: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}; check that the model name matches the checkpoint"
        )
