from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from peftkit.common_kernels.training.fast_path import COMPILE_MIN_ROWS, compile_plan
from peftkit.vision.batched import train_together
from peftkit.vision.methods import VisionAdapter, ViTMethodConfig
from peftkit.vision.train import ViTTrainConfig, train_vit


def test_all_hook_methods_compile_without_graph_breaks(images, kit):
    model = kit.tiny_vit()
    VisionAdapter(
        model,
        ViTMethodConfig.parse("vpt-deep+adaptformer+ssf+lora", vpt_length=2, bottleneck=4, r=2),
    )
    # fullgraph: any graph break is an error; aot_eager traces forward and backward without slow codegen.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(images)
    out.sum().backward()
    torch.testing.assert_close(out, model(images), rtol=1e-5, atol=1e-5)
    assert model.peftkit_vpt.prompts.grad is not None


def test_compile_plan_compiles_long_single_gpu_runs_only():
    rows = COMPILE_MIN_ROWS
    assert compile_plan("auto", "cuda", 1, rows) is True
    assert compile_plan("auto", "cuda", 1, rows - 1) is False  # compiling would cost more
    assert compile_plan("auto", "cuda", 2, rows) is False
    assert compile_plan("auto", "cpu", 1, 10 * rows) is False
    assert compile_plan(True, "cpu", 1, 1) is True and compile_plan(False, "cuda", 1, rows) is False


@pytest.fixture
def compiled_regions(monkeypatch):
    """torch.compile records what it compiles and traces with aot_eager: inductor's codegen is
    torch's business (and slow on a CPU); which forwards compile, how often, and where a run ends
    is ours."""
    from torch._dynamo.utils import counters

    compiled = []
    plain = torch.compile

    def record(fn, **kwargs):
        compiled.append(fn.__self__)
        return plain(fn, **{**kwargs, "backend": "aot_eager", "fullgraph": True})

    monkeypatch.setattr(torch, "compile", record)
    torch._dynamo.reset()
    counters.clear()
    yield compiled
    torch._dynamo.reset()


def _frames() -> int:
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"]


def _run(kit, **overrides):
    settings = dict(
        data="builtin:color",
        model="vit_tiny_patch16_224",
        pretrained=False,
        model_kwargs=dict(kit.TINY),
        builtin_sizes=(64, 32),
        epochs=2,
        batch_size=16,
        warmup_epochs=0,
        mixed_precision="no",
        progress=False,
        cpu=True,
    )
    return ViTTrainConfig(**{**settings, **overrides})


def test_a_compiled_run_compiles_every_block_and_ends_where_an_eager_one_does(
    kit, tmp_path, compiled_regions
):
    results = {}
    for compile in (False, True):
        config = _run(kit, method="vpt-deep+lora", compile=compile, lr=1e-2)
        results[compile] = train_vit(replace(config, output_dir=str(tmp_path / str(compile))))
    assert [type(m).__name__ for m in compiled_regions] == ["Block", "Block"]
    eager, compiled = (load_file(tmp_path / str(c) / "adapter.safetensors") for c in (False, True))
    assert eager.keys() == compiled.keys()  # compiled in place: the same tensor names
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-6)
    assert results[True]["top1"] == pytest.approx(results[False]["top1"])


def test_a_compiled_sweep_group_ends_where_its_configurations_alone_do(
    kit, tmp_path, compiled_regions, float64
):
    pair = [
        _run(kit, method="lora", compile=True, lr=lr, output_dir=str(tmp_path / f"{lr}"))
        for lr in (1e-3, 1e-2)
    ]
    together = train_together(pair, str(tmp_path / "group"))
    assert [r["status"] for r in together] == ["done", "done"] and len(compiled_regions) == 2
    for config, got in zip(pair, together):
        alone = train_vit(replace(config, compile=False, output_dir=config.output_dir + "-alone"))
        assert got["top1"] == pytest.approx(alone["top1"])
        a, b = (
            load_file(f"{d}/adapter.safetensors")
            for d in (config.output_dir, config.output_dir + "-alone")
        )
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["vpt-deep", "ssf", "adaptformer", "bitfit", "lora"])
def test_one_compiled_forward_serves_every_block_of_a_sweep(
    kit, tmp_path, compiled_regions, method
):
    # Per-block names or layer indices read inside a block would compile it once per block (and
    # past torch's limit of 8, leave the rest eager).
    deep = {**kit.TINY, "depth": 6}
    pair = [
        _run(kit, method=method, compile=True, model_kwargs=deep, lr=lr, steps=2)
        for lr in (1e-3, 1e-2)
    ]
    train_together(pair)
    assert len(compiled_regions) == 6 and _frames() <= 2
