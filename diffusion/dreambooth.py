"""DreamBooth with an adapter (Ruiz et al. 2023, "DreamBooth", eq. 2):

    L = E || eps - eps_theta(x_t, t, c_instance) ||^2  +  lambda * E || eps' - eps_theta(x'_t, t', c_class) ||^2

The first term fits the few instance images captioned with a rare identifier ("a photo of sks dog");
the second, prior preservation, keeps the class ("a photo of a dog") as the base model draws it.
Only an adapter trains: any peftkit core (LoRA, LoKr, OFT) on the UNet's attention projections by
default, optionally its feed-forward layers and ResNet convs, plus optionally a LoRA on the text
encoder(s). The frozen VAE latents and text embeddings are computed once before training.

    task = ConceptTask(load_base("./sd15"), ConceptDataset("photos/", "a photo of sks dog"), ConceptConfig(...))
    train(task, task.dataset(), TrainConfig(steps=800, batch_size=1, lr=1e-4, output_dir="out"))
    save_concept(task, "out")
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..common_kernels.adapter_file import atomic_write, save_adapter, staged_folder
from ..common_kernels.config import AdapterConfig
from ..common_kernels.errors import PeftkitError
from ..common_kernels.inject import AdapterHandle, inject
from ..common_kernels.lora import LoRAConfig
from ..common_kernels.registry import core
from ..common_kernels.training.fsdp import like
from ..common_kernels.training.graphed_step import active_dropout, capturable_checkpoint
from ..common_kernels.training.random_stream import RandomStream
from ..common_kernels.training.trackers import MetricsLog, check_report_to
from .base import DiffusionBase
from .buckets import BucketedRows, assign_buckets, bucket_sizes
from .data import ConceptDataset, held_out
from .dit import DIT_PRESETS, fsdp_blocks, gather_whole
from .objective import WEIGHTING_SCHEMES, denoising_targets, prediction_loss, sample_latents

# Named groups of UNet modules; anything else in `targets` is a module pattern (glob or re:).
UNET_PRESETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "ff": ["ff.net.0.proj", "ff.net.2"],
    "conv": [r"re:.*resnets\.\d+\.conv[12]"],
}
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Pixels per forward when scoring fixed losses (16 rows at 512 px, 4 at 1024): at most a training
# step's memory beside it, where 32 rows at 1024 px took SDXL from 14 to 22 GiB.
FIXED_PIXELS = 4 * 1024**2
UNET_FILE, TEXT_FILE, DIFFUSERS_FILE, CONFIG_FILE = (
    "unet_adapter.safetensors",
    "text_encoder_adapter.safetensors",
    "pytorch_lora_weights.safetensors",
    "concept.json",
)


@dataclass
class ConceptConfig:
    """What a DreamBooth run trains. `targets` mixes preset names (attn, ff, conv) and module patterns;
    `rank` is LoRA/LoKr rank, `block_size` OFT's block size; `text_encoder_rank` 0 leaves the text
    encoder frozen. `class_prompt` turns prior preservation on; `buckets` aspect-ratio buckets;
    `validation_images`/`validation_fraction` a validation loss; `new_token` pivotal tuning."""

    instance_prompt: str
    method: str = "lora"
    rank: int = 4
    alpha: float | None = None
    block_size: int = 32
    targets: list[str] = field(default_factory=lambda: ["attn"])
    text_encoder_rank: int = 0
    class_prompt: str | None = None
    num_class_images: int = 100
    prior_weight: float = 1.0
    min_snr_gamma: float = 0.0
    offset_noise: float = 0.0
    gradient_checkpointing: bool = False
    resolution: int = 512
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int = 0
    validation_steps: int = 25
    caption_dropout: float = 0.0  # instance rows trained on the empty prompt, this often
    flip: bool = False  # instance and class rows mirrored left-right half of the time
    # Aspect-ratio buckets (buckets.py); sides in multiples of bucket_step, 0: resolution/2 and 2x.
    buckets: bool = False
    bucket_step: int = 64
    bucket_min_side: int = 0
    bucket_max_side: int = 0
    # Validation loss on a folder or a held-out share of the images, every eval_every steps.
    validation_images: str | None = None
    validation_fraction: float = 0.0
    report_to: str = "none"  # or "tensorboard": metrics.jsonl's numbers also go there
    # Pivotal tuning (pivotal.py): a new token's embeddings train beside the adapter at token_lr.
    new_token: str | None = None
    init_word: str | None = None
    token_vectors: int = 1
    token_lr: float = 1e-3
    weighting_scheme: str = "auto"  # SD3/Flux timestep density or loss weight; auto: the family's

    def __post_init__(self) -> None:
        self.method = core(self.method).name  # aliases (lokr) name the canonical core
        if not self.instance_prompt.strip():
            raise PeftkitError(
                "ConceptConfig.instance_prompt is empty: give a prompt with a rare identifier, "
                "e.g. 'a photo of sks dog'"
            )
        for name in ("rank", "block_size", "resolution", "validation_steps"):
            if getattr(self, name) < 1:
                raise PeftkitError(f"ConceptConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "text_encoder_rank",
            "num_class_images",
            "prior_weight",
            "min_snr_gamma",
            "offset_noise",
            "validation_every",
        ):
            if getattr(self, name) < 0:
                raise PeftkitError(f"ConceptConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.caption_dropout < 1:
            raise PeftkitError(
                f"ConceptConfig.caption_dropout must be in [0, 1), got {self.caption_dropout}"
            )
        if self.resolution % 8:
            raise PeftkitError(
                f"ConceptConfig.resolution must be a multiple of 8, got {self.resolution}"
            )
        if self.weighting_scheme not in ("auto", *WEIGHTING_SCHEMES):
            raise PeftkitError(
                f"ConceptConfig.weighting_scheme must be one of {['auto', *WEIGHTING_SCHEMES]}, "
                f"got {self.weighting_scheme!r}"
            )
        if not self.targets:
            raise PeftkitError(
                f"ConceptConfig.targets is empty: use presets {sorted(UNET_PRESETS)} or module patterns"
            )
        self.bucket_sizes()
        check_report_to(self.report_to)
        if not 0 <= self.validation_fraction < 1:
            raise PeftkitError(
                f"ConceptConfig.validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if self.validation_fraction and self.validation_images:
            raise PeftkitError(
                "ConceptConfig has both validation_images and validation_fraction: give one"
            )
        if self.new_token is not None and not (self.init_word or "").strip():
            raise PeftkitError(
                "ConceptConfig.new_token needs init_word: a word close to the concept, e.g. 'dog'"
            )
        if self.token_vectors < 1 or self.token_lr <= 0:
            raise PeftkitError(
                f"ConceptConfig.token_vectors must be >= 1 and token_lr > 0, got "
                f"{self.token_vectors} and {self.token_lr}"
            )

    def bucket_sizes(self) -> list[tuple[int, int]] | None:
        """The (width, height) buckets, or None when images are center squares."""
        if not self.buckets:
            return None
        return bucket_sizes(
            self.resolution, self.bucket_step, self.bucket_min_side, self.bucket_max_side
        )

    @property
    def validates(self) -> bool:
        return bool(self.validation_images or self.validation_fraction)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> ConceptConfig:
        return ConceptConfig(**json.loads(text))

    def unet_adapter(self, presets: dict[str, list[str]] = UNET_PRESETS) -> AdapterConfig:
        """The denoiser's adapter; `presets`: the UNet's, or DIT_PRESETS for SD3/Flux."""
        patterns = [p for t in self.targets for p in presets.get(t, [t])]
        return self._core(patterns, self.rank)

    def text_adapter(self) -> AdapterConfig:
        return LoRAConfig(targets=TEXT_TARGETS, target_types=["Linear"], r=self.text_encoder_rank)

    def _core(self, patterns: list[str], rank: int) -> AdapterConfig:
        return core(self.method).make_config(
            patterns, rank=rank, alpha=self.alpha, block_size=self.block_size
        )


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device` without blocking the host: a copy from pageable memory waits for all
    queued GPU work, which would stall drawing the next step's rows during this one (multitenant.py)."""
    if device.type == "cuda" and not host.is_cuda:
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass
class ConceptRows:
    """One step's UNet inputs drawn for a batch, and the targets its prediction is scored against:
    everything random about a step, so scoring is deterministic (and CUDA-graph capturable)."""

    noisy: torch.Tensor
    t: torch.Tensor
    cond: dict
    target: torch.Tensor
    weight: torch.Tensor | None  # min-SNR weights per row
    instances: int  # rows [0, instances) are instance rows, the rest class rows


class ConceptModel(nn.Module):
    """What trains and runs each step: the UNet, and the text encoders when they carry a LoRA
    (otherwise their outputs are cached and they stay out of the step)."""

    def __init__(
        self, base: DiffusionBase, text_encoders: list[nn.Module], resolution: int
    ) -> None:
        super().__init__()
        self.unet, self.resolution = base.unet, resolution
        self.text_encoders = nn.ModuleList(text_encoders)
        self._base = [base]  # a list keeps the pipeline out of this module's parameters

    def forward(
        self,
        noisy: torch.Tensor,
        t: torch.Tensor,
        hidden: torch.Tensor | None,
        extra: dict[str, torch.Tensor],
        ids: list[torch.Tensor] | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        base = self._base[0]
        if ids is not None:
            hidden, extra = base.encode_ids(
                ids, list(self.text_encoders), resolution=self.resolution
            )
            if "time_ids" in extra:  # each image's own size and crop (data.crops)
                extra["time_ids"] = time_ids.to(extra["time_ids"])
        return base.predict(self.unet, noisy, t, hidden.to(noisy.dtype), extra)


class ConceptTask:
    """The engine task for DreamBooth: batches are {"instance": i, "class": j} row indices into the
    cached latents and text conditions. A step is `draw` (inputs, from the task's own random
    stream, made eagerly) then `score` (the loss of a prediction for them), so several tasks can
    share one UNet forward (multitenant.py) and the engine can capture the rest of the step
    (`drawn_loss`) as one CUDA graph; `name` is the adapter's name in the UNet."""

    def __init__(
        self,
        base: DiffusionBase,
        instances: ConceptDataset,
        config: ConceptConfig,
        classes: ConceptDataset | None = None,
        seed: int = 0,
        name: str = "concept",
        validation: ConceptDataset | None = None,
    ) -> None:
        if config.class_prompt and classes is None:
            raise PeftkitError(
                "prior preservation needs class images: pass classes= (see data.class_images)"
            )
        self.base, self.instances, self.config, self.classes, self.seed = (
            base,
            instances,
            config,
            classes,
            seed,
        )
        self.rank, self.world = 0, 1  # set by prepare() under DDP
        self.scheduler = base.noise_scheduler(config.weighting_scheme)
        presets = DIT_PRESETS if base.is_transformer else UNET_PRESETS
        # A seeded adapter init makes two runs with one seed identical, which exact resume relies on.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                self.unet_handle = inject(
                    base.unet, config.unet_adapter(presets), name=name, base_model=base.source
                )
            except PeftkitError as err:
                raise PeftkitError(f"{err} (presets: {sorted(presets)})") from None
            self.text_handles: list[AdapterHandle] = []
            if config.text_encoder_rank:
                self.text_handles = [
                    inject(e, config.text_adapter(), name=name, base_model=base.source)
                    for e in base.text_encoders
                ]
        if not self.text_handles:
            for encoder in base.text_encoders:
                encoder.requires_grad_(False)
        for module in (base.vae, *base.frozen_text_encoders):
            module.requires_grad_(False)
        self.pivotal = None
        if config.new_token is not None:
            from .pivotal import PivotalTokens

            self.pivotal = PivotalTokens(
                base, config.new_token, config.init_word, config.token_vectors
            )
            self.pivotal.check_prompts(instances.captions)
        # Sets of images by index: instances, then class images, then held-out validation images.
        self.sets = [instances] + [s for s in (classes, validation) if s is not None]
        self.held = len(self.sets) - 1 if validation is not None else None
        sizes = config.bucket_sizes()
        self.bucket_of = None  # each instance image's bucket in `sizes`
        if sizes is not None:
            names = [p.name for p in instances.paths]
            self.bucket_of = assign_buckets(names, [im.size for im in instances.images], sizes)
        self.sizes = sizes
        if config.gradient_checkpointing:
            # Without dropout the recomputation needs no saved RNG state, so the step stays capturable.
            dropout = active_dropout(base.unet)
            base.unet.enable_gradient_checkpointing(None if dropout else capturable_checkpoint)
        self.model = ConceptModel(
            base, base.text_encoders if self.encodes_text else [], config.resolution
        )

    @property
    def encodes_text(self) -> bool:
        """Whether the text encoders run in the step (a LoRA or new token embeddings train there)."""
        return bool(self.text_handles) or self.pivotal is not None

    def dataset(self) -> list[dict[str, int]] | BucketedRows:
        n_inst = len(self.instances)
        n_class = len(self.classes) if self.classes is not None else 0
        rows = [
            {"instance": i % n_inst, "class": i % n_class if n_class else 0}
            for i in range(max(n_inst, n_class))
        ]
        if self.bucket_of is None:
            return rows
        return BucketedRows(rows, [self.bucket_of[r["instance"]] for r in rows])

    def trainable_parameters(self) -> list[nn.Parameter]:
        text = [p for h in self.text_handles for p in h.trainable_parameters()]
        tokens = self.pivotal.parameters() if self.pivotal is not None else []
        return self.unet_handle.trainable_parameters() + text + tokens

    def param_groups(self, params: list[nn.Parameter], config) -> list[tuple[list, object]]:
        """Optimizer groups: the adapters with the run's settings, the new token embeddings (when
        pivotal tuning) at token_lr on the same schedule."""
        tokens = {id(p) for p in (self.pivotal.parameters() if self.pivotal is not None else [])}
        groups = [
            ([p for p in params if id(p) not in tokens], config),
            (
                [p for p in params if id(p) in tokens],
                dataclasses.replace(config, lr=self.config.token_lr),
            ),
        ]
        return [g for g in groups if g[0]]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"unet.{k}": v for k, v in self.unet_handle.state_dict().items()}
        for i, h in enumerate(self.text_handles):
            state.update({f"text{i}.{k}": v for k, v in h.state_dict().items()})
        if hasattr(self, "stream"):
            state["rng.stream"] = self.stream.state
        if self.pivotal is not None:
            state.update({f"pivotal.{k}": v for k, v in self.pivotal.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "rng.stream" in state and hasattr(self, "stream"):
            self.stream.state = state["rng.stream"].to(torch.uint8)
        if self.pivotal is not None:
            self.pivotal.load_state_dict(
                {k[len("pivotal.") :]: v for k, v in state.items() if k.startswith("pivotal.")}
            )
        for prefix, h in [("unet.", self.unet_handle)] + [
            (f"text{i}.", h) for i, h in enumerate(self.text_handles)
        ]:
            own = dict(h.named_parameters())
            mine = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            # Under FSDP the parameters are shards: cut the whole tensors the same way.
            h.load_state_dict({k: like(own[k], v) if k in own else v for k, v in mine.items()})

    @torch.no_grad()
    def prepare(self, accelerator) -> None:
        device = accelerator.device
        frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            accelerator.mixed_precision, torch.float32
        )
        base = self.base
        for module in (base.unet, base.vae, *base.text_encoders, *base.frozen_text_encoders):
            # Cast while moving, tensor by tensor: moving a whole fp32 copy first would set the
            # run's peak GPU memory. Adapters stay fp32; the frozen base runs in half precision.
            for p in module.parameters():
                p.data = p.data.to(device, p.dtype if p.requires_grad else frozen_dtype)
            module.to(device)
        self.latents, self.mirrored, self.size_ids, self.slot = [], [], [], []
        for which in range(len(self.sets)):
            self._encode(which, device)
        self.device = device
        # Token ids live on the device, so a step gathers its captions' ids there: nothing in a
        # step that encodes text waits for the GPU, and the step can be captured.
        if self.config.caption_dropout:
            self.empty = (
                [i.to(device) for i in self.base.tokenize([""])]
                if self.encodes_text
                else self.base.encode_prompt([""], self.config.resolution)
            )
        prompt = self.pivotal.prompt if self.pivotal is not None else (lambda text: text)
        self.captions = [[prompt(c) for c in s.captions] for s in self.sets]
        if self.encodes_text:
            self.ids = [[i.to(device) for i in self.base.tokenize(c)] for c in self.captions]
        else:
            self.conds = [self.base.encode_prompt(c, self.config.resolution) for c in self.captions]
        self.stream = RandomStream(self.seed, device)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        if device.type == "cuda":
            self.release_encoders()

    def _encode(self, which: int, device: torch.device) -> None:
        """Latents (and mirrored ones, and SDXL size ids) of set `which` for each bucket it is drawn
        in (None: center squares): an instance image in its own bucket, a class image in every
        bucket the instances use, a held-out image as a center square. `slot` maps an image to
        its row in its bucket's tensors."""
        from .pairs import encode_latents

        images = self.sets[which]
        used = sorted(set(self.bucket_of)) if self.bucket_of is not None else [None]
        rows = {b: list(range(len(images))) for b in (used if which != self.held else [None])}
        if which == 0 and self.bucket_of is not None:
            rows = {b: [i for i, c in enumerate(self.bucket_of) if c == b] for b in used}
        slot = torch.zeros(len(images), dtype=torch.long)
        latents, mirrored, size_ids = {}, {}, {}
        for b, members in rows.items():
            slot[members] = torch.arange(len(members))
            pixels, sizes = images.crops(None if b is None else self.sizes[b], members)
            latents[b] = encode_latents(self.base.vae, pixels)
            if self.config.flip:  # the mirrored images, encoded once like the others
                mirrored[b] = encode_latents(self.base.vae, pixels.flip(-1))
            size_ids[b] = sizes.to(device)
        self.latents.append(latents)
        self.mirrored.append(mirrored)
        self.size_ids.append(size_ids)
        self.slot.append(slot.to(device))

    def release_encoders(self) -> None:
        """Move the VAE (and text encoders without a LoRA) off the GPU once their outputs are
        cached: training reads only the caches, and validation images bring them back."""
        for module in self.encoders():
            module.to("cpu")
        torch.cuda.empty_cache()

    def encoders(self) -> list[nn.Module]:
        """The frozen modules whose outputs are cached: the VAE, and the text encoders unless a
        LoRA or new token embeddings train there."""
        text = [] if self.encodes_text else list(self.base.text_encoders)
        return [self.base.vae, *text, *self.base.frozen_text_encoders]

    def _bucket(self, which: int, index: torch.Tensor) -> int | None:
        """The bucket a batch of set `which` is drawn in: its first instance image's (every row of
        a batch shares it, `BucketedRows`); class rows follow the instance rows' bucket."""
        if self.bucket_of is None or which == self.held:
            return None
        if len(set(self.bucket_of)) == 1:  # without reading `index`, which may be on the GPU
            return self.bucket_of[0]
        return self.bucket_of[int(index[0])]

    def _rows(
        self, which: int, index: torch.Tensor, bucket: int | None
    ) -> tuple[torch.Tensor, dict]:
        mean, std = self.latents[which][bucket]
        # the image's number in its set, which picks its caption
        image = to_device_async(index, mean.device)
        index = self.slot[which][image]
        sizes = self.size_ids[which][bucket][index]
        latents = sample_latents(mean[index], std[index])
        n, config = len(index), self.config
        # extra draws only when asked for, so runs without flip or dropout keep their numbers
        if config.flip:
            mirror = torch.rand(n, device=mean.device) < 0.5
            mirrored = sample_latents(*(m[index] for m in self.mirrored[which][bucket]))
            latents = torch.where(mirror.view(-1, 1, 1, 1), mirrored, latents)
        drop = None
        if config.caption_dropout and which == 0:
            drop = torch.rand(n, device=mean.device) < config.caption_dropout
        if self.encodes_text:
            ids = [i[image] for i in self.ids[which]]
            if drop is not None:
                ids = [
                    torch.where(drop.view(-1, *[1] * (i.dim() - 1)), e, i)
                    for e, i in zip(self.empty, ids)
                ]
            return latents, {"ids": ids, "time_ids": sizes}
        hidden, extra = self.conds[which]
        hidden, extra = hidden[image], {k: v[image] for k, v in extra.items()}
        if drop is not None:
            empty_hidden, empty_extra = self.empty
            hidden = torch.where(drop.view(-1, 1, 1), empty_hidden.to(hidden.dtype), hidden)
            extra = {
                k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), empty_extra[k], v)
                if k in ("text_embeds", "pooled_projections")
                else v
                for k, v in extra.items()
            }
        if "time_ids" in extra:  # each image's own size and crop (data.crops)
            extra["time_ids"] = sizes.to(extra["time_ids"])
        return latents, {"hidden": hidden, "extra": extra}

    def draw(self, batch: dict[str, torch.Tensor]) -> ConceptRows:
        """The UNet inputs of `batch`: instance (then class) rows, noised at random timesteps.

        With N processes every one draws the numbers of the whole global batch from the same
        stream and keeps its own rows, so N processes train what one does on the global batch
        (the engine gives process r the r-th slice of each global batch). The draws depend only
        on shapes, so this process's rows stand in for the others' while drawing."""
        world, rank = self.world, self.rank
        keep = None
        if world > 1:
            local = [
                batch["instance"].shape[0],
                batch["class"].shape[0] if self.classes is not None else 0,
            ]
            batch = {k: v.repeat(world) for k, v in batch.items()}
            offsets = [0, local[0] * world]
            keep = torch.cat(
                [torch.arange(o + rank * n, o + (rank + 1) * n) for o, n in zip(offsets, local)]
            )
        rows = self._draw_all(batch)
        if keep is None:
            return rows
        keep = to_device_async(keep, rows.noisy.device)
        if self.encodes_text:
            cond = {
                **rows.cond,
                "ids": [i[keep] for i in rows.cond["ids"]],
                "time_ids": rows.cond["time_ids"][keep],
            }
        else:
            cond = {
                "hidden": rows.cond["hidden"][keep],
                "extra": {k: v[keep] for k, v in rows.cond["extra"].items()},
            }
        weight = None if rows.weight is None else rows.weight[keep]
        return ConceptRows(
            rows.noisy[keep], rows.t[keep], cond, rows.target[keep], weight, rows.instances // world
        )

    def _draw_all(self, batch: dict[str, torch.Tensor], which: int = 0) -> ConceptRows:
        """Rows of set `which` (instances; the held-out set when scoring validation), then the
        class rows when there are class images."""
        bucket = self._bucket(which, batch["instance"])
        with self.stream.drawing():
            parts = [self._rows(which, batch["instance"], bucket)]
            if self.classes is not None:
                parts.append(self._rows(1, batch["class"], bucket))
            latents = torch.cat([p[0] for p in parts])
            noisy, t, target, weight = denoising_targets(
                self.scheduler, latents, self.config.offset_noise, self.config.min_snr_gamma
            )
        if self.encodes_text:
            cond = {
                "hidden": None,
                "extra": {},
                "ids": [torch.cat(z) for z in zip(*[p[1]["ids"] for p in parts])],
                "time_ids": torch.cat([p[1]["time_ids"] for p in parts]),
            }
        else:
            cond = {
                "hidden": torch.cat([p[1]["hidden"] for p in parts]),
                "extra": {
                    k: torch.cat([p[1]["extra"][k] for p in parts]) for k in parts[0][1]["extra"]
                },
            }
        return ConceptRows(noisy, t, cond, target, weight, batch["instance"].shape[0])

    def score(self, rows: ConceptRows, pred: torch.Tensor) -> torch.Tensor:
        """DreamBooth's loss of `pred` for `rows`: instance mean (+ prior_weight x class mean)."""
        per_sample = prediction_loss(pred, rows.target, rows.weight)
        loss = per_sample[: rows.instances].mean()
        if self.classes is not None:
            loss = loss + self.config.prior_weight * per_sample[rows.instances :].mean()
        return loss

    def drawn_loss(self, model: nn.Module, rows: ConceptRows) -> torch.Tensor:
        """The loss of drawn rows: a pure function of tensors, which the engine can capture."""
        return self.score(rows, model(rows.noisy, rows.t, **rows.cond))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.drawn_loss(model, self.draw(batch))

    def fsdp_blocks(self) -> list[nn.Module]:
        """FSDP units (common_kernels/training/fsdp.py): an SD3/Flux transformer's blocks, each
        sharding its frozen weights with its LoRA (dit.fsdp_blocks)."""
        return fsdp_blocks(self.base, self.config.method)

    @property
    def graph_unsafe(self) -> str | None:
        """Why the step cannot be captured as one CUDA graph (the engine then runs it eagerly)."""
        if self.config.gradient_checkpointing and active_dropout(self.base.unet):
            return (
                "gradient checkpointing of a UNet with dropout restores the RNG state on the host"
            )
        if self.bucket_of is not None and len(set(self.bucket_of)) > 1:
            # One graph per bucket would hold one copy of the step's activations per shape.
            return "aspect-ratio buckets give batches of several shapes"
        return None

    @property
    def reads_model_every(self) -> int:
        """Steps whose step event generates validation images with the adapter being trained."""
        return self.config.validation_every if self.config.validation_prompts else 0

    def fixed_loss(self, seed: int = 1234, repeats: int = 4, which: int = 0) -> float:
        """Loss of set `which` (the instance images, or the held-out ones) under fixed noise and
        timesteps (each image `repeats` times, since one timestep per image is a noisy estimate):
        comparable across steps and runs. Scored bucket by bucket, FIXED_PIXELS at a time."""
        n = len(self.sets[which])
        buckets = self.bucket_of if which == 0 and self.bucket_of is not None else [None] * n
        groups = [[i for i in range(n) if buckets[i] == b] for b in dict.fromkeys(buckets)]
        rows_per = max(1, FIXED_PIXELS // self.config.resolution**2)
        stream, self.stream = self.stream, RandomStream(seed, self.device)
        classes, self.classes = self.classes, None
        world, self.world = self.world, 1  # each process scores the whole fixed set itself
        total = 0.0
        try:
            with torch.no_grad():
                for group in groups:
                    for rows in torch.tensor(group).repeat(repeats).split(rows_per):
                        batch = {"instance": rows, "class": torch.zeros(0, dtype=torch.long)}
                        loss = self.drawn_loss(self.model, self._draw_all(batch, which))
                        total += float(loss) * len(rows)
        finally:
            self.stream, self.classes, self.world = stream, classes, world
        return total / (n * repeats)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        metrics = {"instance_loss": self.fixed_loss()}
        if self.held is not None:
            metrics["validation_loss"] = self.fixed_loss(which=self.held)
        return metrics


def validation_images(
    task: ConceptTask, output_dir: str | Path, seed: int = 0, log: MetricsLog | None = None
):
    """An engine `on_event` callback saving images of the validation prompts every
    `validation_every` steps to <output_dir>/validation/step-N/ (and to `log`'s tracker). The
    training RNG is left untouched, so runs with and without validation images train identically."""
    config = task.config
    folder = Path(output_dir) / "validation"

    def on_event(event: dict) -> None:
        if (
            event["kind"] != "step"
            or not config.validation_every
            or event["step"] % config.validation_every
        ):
            return
        out = folder / f"step-{event['step']:07d}"
        out.mkdir(parents=True, exist_ok=True)
        was_training = task.model.training
        task.model.eval()
        device = task.base.unet.device
        encoders = task.encoders()
        for module in encoders:
            module.to(device)
        samples = {}
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for i, prompt in enumerate(config.validation_prompts):
                generator = torch.Generator("cpu").manual_seed(seed + i)
                image = task.base.pipe(
                    prompt,
                    num_inference_steps=config.validation_steps,
                    generator=generator,
                    height=config.resolution,
                    width=config.resolution,
                ).images[0]
                image.save(out / f"{i:02d}.png")
                samples[f"{i:02d}"] = image
        if log is not None:
            log.images(event["step"], samples)
        if device.type == "cuda":
            task.release_encoders()
        task.model.train(was_training)

    return on_event


def save_concept(task: ConceptTask, output_dir: str | Path) -> list[Path]:
    """Write the trained adapter(s): peftkit files (any core), plus for LoRA a diffusers file that
    `pipe.load_lora_weights(output_dir)` loads. The files move in together (staged_folder)."""
    output_dir = Path(output_dir)
    denoiser = task.base.component
    extra = {"instance_prompt": task.config.instance_prompt, "component": denoiser}
    with staged_folder(output_dir) as stage:
        written = [save_adapter(task.unet_handle, stage / UNET_FILE, extra)]
        # Component names follow the diffusers pipeline attributes: text_encoder, text_encoder_2.
        components = {
            "text_encoder" if i == 0 else f"text_encoder_{i + 1}": h
            for i, h in enumerate(task.text_handles)
        }
        for component, handle in components.items():
            name = TEXT_FILE.replace("text_encoder", component)
            written.append(save_adapter(handle, stage / name, {**extra, "component": component}))
        if task.pivotal is not None:
            written.append(task.pivotal.save(stage))
        if task.config.method == "lora":
            from .formats import save_diffusers_lora

            written.append(
                save_diffusers_lora(
                    {denoiser: task.unet_handle, **components}, stage / DIFFUSERS_FILE
                )
            )
        atomic_write(stage / CONFIG_FILE, lambda tmp: Path(tmp).write_text(task.config.to_json()))
    return [output_dir / p.name for p in written]


def with_validation_cadence(train_config, config: ConceptConfig):
    """`train_config` scoring the validation loss every eval_every steps: a tenth of the run when
    a validation set is given without a cadence."""
    if not config.validates or train_config.eval_every:
        return train_config
    return dataclasses.replace(train_config, eval_every=max(1, train_config.steps // 10))


def _device(train_config) -> str:
    return "cuda" if torch.cuda.is_available() and not train_config.cpu else "cpu"


def train_concept(
    base: DiffusionBase,
    instance_dir: str | Path,
    config: ConceptConfig,
    train_config,
    class_dir: str | Path | None = None,
    on_event=None,
    started: float | None = None,
):
    """The whole DreamBooth run: read the images, make or reuse class images, train (resuming from
    the newest checkpoint in train_config.output_dir), save. Returns (task, TrainResult).
    `started`: the time.perf_counter() the command began at, for the printed set-up time."""
    from ..common_kernels.training.engine import launch_world, train
    from .data import class_images

    instances = ConceptDataset(instance_dir, config.instance_prompt, config.resolution)
    instances, validation = held_out(
        instances, config.validation_images, config.validation_fraction, train_config.seed
    )
    train_config = with_validation_cadence(train_config, config)
    classes = None
    if config.class_prompt:
        if class_dir is None:
            if not train_config.output_dir:
                raise PeftkitError(
                    "prior preservation needs a class image folder: pass class_dir or an output_dir"
                )
            class_dir = Path(train_config.output_dir) / "class_images"
        classes = class_images(
            base,
            class_dir,
            config.class_prompt,
            config.num_class_images,
            config.resolution,
            seed=train_config.seed,
            device=_device(train_config),
        )
    task = ConceptTask(
        base, instances, config, classes, seed=train_config.seed, validation=validation
    )
    writes = train_config.output_dir and launch_world()[0] == 0
    log = MetricsLog(train_config.output_dir, config.report_to) if writes else None
    callbacks = [
        c
        for c in (
            on_event,
            log,
            validation_images(task, train_config.output_dir or ".", train_config.seed, log)
            if config.validation_every and config.validation_prompts
            else None,
        )
        if c
    ]
    result = train(
        task,
        task.dataset(),
        train_config,
        on_event=lambda e: [c(e) for c in callbacks],
        started=started,
    )
    if train_config.output_dir:
        gather_whole(task.model)  # under FSDP every process joins the gather; process 0 writes
        if launch_world()[0] == 0:
            save_concept(task, train_config.output_dir)
    return task, result
