"""Fine-tune and evaluate a ViT with any method composition on the shared engine.

    >>> from peftkit.vision.train import ViTTrainConfig, train_vit
    >>> results = train_vit(ViTTrainConfig(model="vit_base_patch16_224", data="vtab:vtab-1k/dtd",
    ...                                    method="lora", output_dir="runs/dtd-lora"))  # doctest: +SKIP
    >>> results["top1"]  # doctest: +SKIP

The run writes <output_dir>/adapter.safetensors (trained tensors + method config + backbone spec)
and <output_dir>/results.json (top-1, trainable parameters, throughput, peak memory, history);
checkpoints go to <output_dir>/checkpoints and a rerun resumes from the newest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.common_kernels.adapter_file import atomic_write
from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.training.data_cache import cache_dataset, eval_batches
from peftkit.common_kernels.training.engine import TrainConfig, launch_world, train
from peftkit.common_kernels.training.fast_path import compile_plan, default_device_type

from .backbones import create_backbone, normalization, vit_layout
from .data import Preprocess, TaskData, load_task
from .fgvc import crop_generator
from .methods import VisionAdapter, ViTMethodConfig, load_vision_adapter, read_vision_adapter
from .recipes import method_defaults


@dataclass
class ViTTrainConfig:
    """Everything a run needs. Defaults follow the VTAB-1k recipes of VPT/SSF: 100 epochs,
    batch 64, AdamW, 10 warm-up epochs then cosine, no augmentation; `lr` / `weight_decay` None
    take the method's own (recipes.py)."""

    data: str = "builtin:counting"
    model: str = "vit_base_patch16_224"
    pretrained: bool = True
    checkpoint: str | None = None
    open_clip: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    protocol: str = "final"
    img_size: int | None = None
    num_classes: int | None = None
    builtin_sizes: tuple[int, int] | None = None
    epochs: int = 100
    steps: int | None = None
    batch_size: int = 64
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float = 10.0
    grad_accum: int = 1
    mixed_precision: str = "auto"  # bf16 on a GPU that supports it, else "no"
    cuda_graph: bool | str = "auto"  # each step one CUDA graph on a single GPU when possible
    compile: bool | str = "auto"  # the blocks compiled for long single-GPU runs (compile_plan)
    label_smoothing: float = 0.0
    eval_every_epochs: int = 1
    checkpoint_every_epochs: int = 10
    eval_batch_size: int = 256
    seed: int = 0
    output_dir: str | None = None
    progress: bool = True
    cpu: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or (self.steps is not None and self.steps < 1):
            raise PeftkitError(
                f"ViTTrainConfig.epochs/steps must be >= 1, got epochs={self.epochs}, steps={self.steps}"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise PeftkitError(
                f"ViTTrainConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if self.warmup_epochs < 0:
            raise PeftkitError(
                f"ViTTrainConfig.warmup_epochs must be >= 0, got {self.warmup_epochs}"
            )
        ViTMethodConfig.parse(self.method, **self.method_options)

    def optimizer_settings(self) -> tuple[float, float]:
        """(lr, weight decay): the ones given, else the method's defaults (recipes.py)."""
        lr, wd = method_defaults(self.method)
        return (
            lr if self.lr is None else self.lr,
            wd if self.weight_decay is None else self.weight_decay,
        )

    def backbone_spec(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "open_clip": self.open_clip,
            "model_kwargs": self.model_kwargs,
            "img_size": self.img_size,
        }


def build_model(
    spec: dict[str, Any], num_classes: int, pretrained: bool, checkpoint: str | None
) -> tuple[nn.Module, int]:
    """The backbone of `spec` with a `num_classes` head, and its input size."""
    kwargs = dict(spec.get("model_kwargs") or {})
    if spec.get("open_clip") or kwargs.get("open_clip_config"):
        model = create_backbone(
            num_classes=num_classes,
            pretrained=pretrained,
            checkpoint=checkpoint,
            open_clip=spec.get("open_clip"),
            open_clip_config=kwargs.get("open_clip_config"),
        )
        native = model.visual.image_size[0]
        if spec.get("img_size") not in (None, native):
            raise PeftkitError(
                f"open_clip towers take their own input size ({native}), not --img-size "
                f"{spec['img_size']}: drop --img-size"
            )
    else:
        if spec.get("img_size"):
            # timm builds position embeddings (and Swin windows) for this size and resamples
            # pretrained ones to it (DINOv2 ships at 518); the starter's size is fixed
            kwargs.setdefault("img_size", spec["img_size"])
        model = create_backbone(
            spec["model"],
            num_classes=num_classes,
            pretrained=pretrained,
            checkpoint=checkpoint,
            **kwargs,
        )
        native = model.patch_embed.img_size[0]
    return model, spec.get("img_size") or native


class ViTTask:
    """The engine's task: cross-entropy on (image, label) batches, top-1 on the eval split."""

    def __init__(
        self,
        model: nn.Module,
        adapter: VisionAdapter,
        eval_set,
        eval_batch_size: int,
        label_smoothing: float = 0.0,
        should_stop: Callable[[], bool] | None = None,
        crops: torch.Generator | None = None,
    ) -> None:
        self.model, self.adapter, self.eval_set = model, adapter, eval_set
        self.crops = crops  # the training set's random crops (FGVC): checkpoints keep its state
        self.should_stop = should_stop
        self.eval_batch_size, self.label_smoothing = eval_batch_size, label_smoothing
        self.device = torch.device("cpu")
        self.eval_seconds = 0.0
        self.history: list[dict[str, float]] = []

    def prepare(self, accelerator) -> None:
        self.device = accelerator.device
        # Decoded once, like the training split: every evaluation then reads tensors.
        self.eval_set = cache_dataset(self.eval_set, self.device) or self.eval_set

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.adapter.trainable_parameters()

    def compile_regions(self) -> list[nn.Module]:
        return backbone_blocks(self.model)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels, label_smoothing=self.label_smoothing)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        start = time.perf_counter()
        metrics = evaluate_model(
            model, self.eval_set, self.eval_batch_size, self.device, self.should_stop
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.eval_seconds += time.perf_counter() - start
        self.history.append(metrics)
        return metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        crops = {} if self.crops is None else {"data.crops": self.crops.get_state()}
        return {**self.adapter.state_dict(), **crops}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.crops is not None:
            self.crops.set_state(state["data.crops"])
        self.adapter.load_state_dict({k: v for k, v in state.items() if k != "data.crops"})


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset,
    batch_size: int,
    device: torch.device,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over `dataset`."""
    was_training = model.training
    model.eval()
    correct, total, loss = 0, 0, 0.0
    # A Cancel arriving mid-evaluation ends it (a large split must not outlive it); the engine's
    # final evaluation after a graceful stop still runs.
    watching = should_stop is not None and not should_stop()
    with eager_blocks():
        for images, labels in eval_batches(dataset, batch_size, device):
            if watching and should_stop():
                raise PeftkitError("evaluation cancelled")
            images, labels = images.to(device), labels.to(device)
            logits = model(images).float()
            correct += int((logits.argmax(-1) == labels).sum())
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            total += labels.numel()
    model.train(was_training)
    return {"top1": 100.0 * correct / total, "eval_loss": loss / total, "eval_examples": total}


def backbone_blocks(model: nn.Module) -> list[nn.Module]:
    """The backbone's repeated blocks: what a run compiles (one compiled graph per block shape)."""
    return [model.get_submodule(name) for name in vit_layout(model).blocks]


def eager_blocks():
    """Evaluation runs the blocks eagerly: its batch sizes and no-grad mode would each compile
    them again, for a pass that is a small part of a run."""
    return torch.compiler.set_stance("force_eager")


def load_data(config: ViTTrainConfig):
    """The task's train and eval sets, preprocessed for the backbone's input size."""
    probe, img_size = build_model(config.backbone_spec(), 1, False, None)
    transform = Preprocess(img_size, *normalization(probe))
    return load_task(
        config.data,
        config.protocol,
        transform,
        config.num_classes,
        config.builtin_sizes,
        config.seed,
    )


def engine_config(config: ViTTrainConfig, n_train: int, world: int) -> tuple[TrainConfig, int]:
    """The engine's settings for `config` on `n_train` examples, and the steps of one epoch."""
    # batch_size is per process: an epoch is over the global batch, as one process with it would
    # see; its last batch is filled up from the epoch's start, so every image is seen each epoch.
    per_epoch = -(-n_train // (config.batch_size * config.grad_accum * world))
    steps = config.steps or config.epochs * per_epoch
    warmup, note = warmup_steps(config.warmup_epochs, per_epoch, steps)
    if note and launch_world()[0] == 0:
        print(note)
    lr, weight_decay = config.optimizer_settings()
    rows = steps * config.batch_size * config.grad_accum
    compiled = compile_plan(config.compile, default_device_type(config.cpu), world, rows)
    engine = TrainConfig(
        steps=steps,
        batch_size=config.batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup,
        schedule="cosine",
        grad_accum=config.grad_accum,
        mixed_precision=config.mixed_precision,
        cuda_graph=config.cuda_graph,
        compile=compiled,
        seed=config.seed,
        output_dir=config.output_dir,
        checkpoint_every=config.checkpoint_every_epochs * per_epoch,
        eval_every=config.eval_every_epochs * per_epoch,
        progress=config.progress,
        cpu=config.cpu,
    )
    return engine, per_epoch


def train_vit(
    config: ViTTrainConfig,
    on_event: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train `config.method` on `config.data` and return (and write) the results."""
    entered = time.perf_counter()
    spec = config.backbone_spec()
    data = load_data(config)  # input size and normalization before the model
    torch.manual_seed(config.seed)
    model, _ = build_model(spec, data.num_classes, config.pretrained, config.checkpoint)
    base_name = config.checkpoint or (config.open_clip or config.model)
    adapter = VisionAdapter(
        model, ViTMethodConfig.parse(config.method, **config.method_options), base_model=base_name
    )
    task = ViTTask(
        model,
        adapter,
        data.eval,
        config.eval_batch_size,
        config.label_smoothing,
        should_stop,
        crop_generator(data.train),
    )

    rank, world = launch_world()
    engine, per_epoch = engine_config(config, len(data.train), world)
    start = time.perf_counter()
    result = train(
        task, data.train, engine, on_event=on_event, should_stop=should_stop, started=entered
    )
    seconds = time.perf_counter() - start - task.eval_seconds
    done_steps = result.step - (result.resumed_from or 0)
    images = done_steps * config.batch_size * config.grad_accum * world
    images_per_s = images / seconds if seconds > 0 else 0.0
    results = run_results(
        config,
        data,
        adapter,
        result,
        task.history,
        engine,
        per_epoch,
        images_per_s,
    )
    if config.output_dir and rank == 0:
        write_run(config, adapter, data, results)
    return results


def run_results(
    config: ViTTrainConfig,
    data,
    adapter: VisionAdapter,
    result,
    history: list[dict[str, float]],
    engine: TrainConfig,
    per_epoch: int,
    images_per_s: float,
) -> dict[str, Any]:
    """What results.json holds for one run (also each configuration of a batched sweep)."""
    return {
        "method": adapter.config.name,
        "task": data.name,
        "data": config.data,
        "protocol": config.protocol,
        "splits": list(data.splits),
        "num_classes": data.num_classes,
        "top1": history[-1].get("top1") if history else None,
        "eval_loss": history[-1].get("eval_loss") if history else None,
        **adapter.parameter_counts(),
        "steps": result.step,
        "steps_per_epoch": per_epoch,
        "lr": engine.lr,
        "weight_decay": engine.weight_decay,
        "warmup_steps": engine.warmup_steps,
        "images_per_s": images_per_s,
        "peak_memory_gib": result.peak_memory_gib,
        "timing": result.timing,
        "resumed_from": result.resumed_from,
        "final_loss": result.losses[-1] if result.losses else None,
        "history": history,
        "method_config": adapter.config.to_dict(),
        "config": asdict(config),
    }


def write_run(
    config: ViTTrainConfig, adapter: VisionAdapter, data: TaskData, results: dict[str, Any]
) -> None:
    """<output_dir>/adapter.safetensors (with what vit-eval needs to rebuild the backbone, and the
    class names where the data has them) and results.json."""
    out = Path(config.output_dir)
    weights = {"pretrained": config.pretrained, "checkpoint": config.checkpoint}
    extra = {
        "backbone": json.dumps(config.backbone_spec()),
        "weights": json.dumps(weights),
        "num_classes": str(data.num_classes),
        "seed": str(config.seed),
    }
    if data.class_names:
        extra["class_names"] = json.dumps(list(data.class_names))
    adapter.save(out / "adapter.safetensors", extra=extra)
    atomic_write(
        out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2))
    )


def warmup_steps(warmup_epochs: float, per_epoch: int, steps: int) -> tuple[int, str | None]:
    """Warm-up steps, and a line saying so when the asked warm-up is not shorter than the run
    (then it is scaled to a tenth of the run, the share of the 10-in-100-epoch recipe)."""
    asked = int(warmup_epochs * per_epoch)
    if asked < steps:
        return asked, None
    scaled = steps // 10
    return scaled, (
        f"warm-up of {asked} steps ({warmup_epochs:g} epochs) is not shorter than the run's "
        f"{steps} steps: warming up for {scaled} steps (a tenth of the run) instead"
    )


def evaluate_vit(
    adapter_path: str,
    data: str,
    split: str = "test",
    pretrained: bool | None = None,
    checkpoint: str | None = None,
    batch_size: int = 256,
    builtin_sizes: tuple[int, int] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Top-1 of a saved adapter on `data`'s eval split ("test" = protocol final, "val200" = tune).
    The backbone and the source of its frozen weights (hub, local checkpoint or seeded random init)
    come from the adapter file; `pretrained` / `checkpoint` override the source (e.g. the same
    checkpoint at another path)."""
    _, _, meta = read_vision_adapter(adapter_path)
    if "backbone" not in meta:
        raise PeftkitError(
            f"{adapter_path!r} has no backbone spec: it was not written by train_vit"
        )
    spec, num_classes = json.loads(meta["backbone"]), int(meta["num_classes"])
    weights = json.loads(meta.get("weights", '{"pretrained": true, "checkpoint": null}'))
    checkpoint = checkpoint or (weights["checkpoint"] if pretrained is None else None)
    pretrained = weights["pretrained"] if pretrained is None else pretrained
    torch.manual_seed(
        int(meta.get("seed", 0))
    )  # a random-init backbone is rebuilt exactly as in training
    model, img_size = build_model(spec, num_classes, pretrained, checkpoint)
    protocol = {"test": "final", "val200": "tune"}.get(split)
    if protocol is None:
        raise PeftkitError(f"split {split!r} cannot be evaluated: use 'test' or 'val200'")
    task = load_task(
        data, protocol, Preprocess(img_size, *normalization(model)), num_classes, builtin_sizes
    )
    adapter = load_vision_adapter(model, adapter_path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    metrics = evaluate_model(model, task.eval, batch_size, dev)
    return {
        "adapter": adapter_path,
        "method": adapter.config.name,
        "data": data,
        "split": split,
        **metrics,
    }
