"""Batched sweeps: K configurations trained in one pass end exactly where each ends alone (float64,
CPU) for every method; groups form by what configurations share; a diverging configuration fails
alone; an interrupted group resumes every configuration."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.training import engine
from peftkit.common_kernels.training.graphed_step import GraphedStep, clone_batch
from peftkit.vision.batched import group_configs, train_together
from peftkit.vision.methods import read_vision_adapter
from peftkit.vision.train import ViTTrainConfig, train_vit

COLORS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 220, 40)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 4-class VTAB-1k-layout folder of noisy colour squares."""
    root = tmp_path_factory.mktemp("colors")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(48):
        label = i % 4
        pixels = np.clip(rng.normal(COLORS[label], 40, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        lines.append(f"images/{i}.png {label}")
    splits = {"train800": lines[:32], "val200": lines[32:], "test": lines[32:]}
    splits["train800val200"] = lines
    for name, rows in splits.items():
        (root / f"{name}.txt").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from a second thread, and lose much when the cores are busy.
    torch.set_num_threads(1)


@pytest.fixture
def base(kit, folder):
    """A run on a local tiny-ViT checkpoint: its 7-class head is dropped, so each run's head (like
    its adapter) comes from its seed, and configurations of different seeds share the backbone."""
    path = folder / "tiny.safetensors"
    if not path.exists():
        model = kit.tiny_vit(num_classes=7, seed=3)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return ViTTrainConfig(
        data=f"vtab:{folder}",
        model="vit_tiny_patch16_224",
        checkpoint=str(path),
        model_kwargs=dict(kit.TINY),
        epochs=2,
        batch_size=8,
        lr=1e-2,
        warmup_epochs=1,
        progress=False,
        cpu=True,
        eval_every_epochs=1,
        checkpoint_every_epochs=0,
    )


def _pair(base, tmp_path, method, **options):
    """Two configurations that differ in every per-configuration setting (three for combined
    methods: the third shares the first's seed, so two of them start alike)."""
    common = dict(method=method, method_options=options)
    third = [replace(base, **common, lr=2e-2, seed=0, output_dir=str(tmp_path / "c"))]
    return [
        replace(base, **common, seed=0, output_dir=str(tmp_path / "a")),
        replace(
            base,
            **common,
            lr=3e-3,
            weight_decay=0.05,
            warmup_epochs=0,
            label_smoothing=0.1,
            seed=1,
            output_dir=str(tmp_path / "b"),
        ),
    ] + (third if "+" in method else [])


def _tensors(config):
    return read_vision_adapter(f"{config.output_dir}/adapter.safetensors")[1]


METHODS = [
    ("linear", {}),
    ("bitfit", {}),
    ("lora", {"r": 2}),
    ("oft", {"block_size": 8}),
    ("kron", {"r": 2, "factor": 4}),
    ("dora", {"r": 2}),
    ("loha", {"r": 2}),
    ("boft", {"block_size": 4}),
    ("ssf", {}),
    ("adaptformer", {"bottleneck": 4}),
    ("vpt-shallow", {"vpt_length": 3}),
    ("vpt-deep", {"vpt_length": 3}),
    ("vpt-deep+lora+bitfit", {"vpt_length": 2, "r": 2}),
    ("ssf+adaptformer+oft", {"bottleneck": 4, "block_size": 8}),
]


@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
def test_configurations_trained_together_end_as_each_alone(
    base, tmp_path, float64, method, options
):
    configs = _pair(base, tmp_path / "together", method, **options)
    assert len(group_configs(configs)) == 1
    together = train_together(configs, group_dir=str(tmp_path / "group"))
    for k, config in enumerate(configs):
        solo = replace(config, output_dir=str(tmp_path / f"alone{k}"))
        alone = train_vit(solo)
        got, want = _tensors(config), _tensors(solo)
        assert sorted(got) == sorted(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-11)
        assert [h["top1"] for h in together[k]["history"]] == [h["top1"] for h in alone["history"]]
        # Evaluation reads float32 logits, as evaluate_model does.
        assert together[k]["eval_loss"] == pytest.approx(alone["eval_loss"], rel=1e-6)
        assert together[k]["status"] == "done" and together[k]["trainable"] == alone["trainable"]
    # Different seeds and learning rates: the two configurations really differ.
    a, b = _tensors(configs[0]), _tensors(configs[1])
    assert not torch.allclose(a["head.weight"], b["head.weight"])


@pytest.fixture(scope="module")
def fgvc(tmp_path_factory):
    """A 4-class FGVC folder (train/ and test/ class folders): its crops are random."""
    root = tmp_path_factory.mktemp("fgvc")
    rng = np.random.default_rng(1)
    for split, n in (("train", 8), ("test", 3)):
        for label, color in enumerate(COLORS):
            (root / split / str(label)).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(color, 60, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / str(label) / f"{i}.png")
    return root


def test_fgvc_configurations_together_crop_and_end_as_each_alone_and_resume_exactly(
    base, tmp_path, float64, fgvc
):
    def configs(where, **kw):
        point = replace(base, data=f"fgvc:{fgvc}", protocol="final", **kw)
        return _pair(point, tmp_path / where, "lora", r=2)

    together = configs("together")
    train_together(together, group_dir=str(tmp_path / "g0"))
    for k, config in enumerate(together):
        solo = replace(config, output_dir=str(tmp_path / f"alone{k}"))
        train_vit(solo)
        for name, want in _tensors(solo).items():
            torch.testing.assert_close(_tensors(config)[name], want, rtol=1e-9, atol=1e-11)
    # Stopped after 3 steps and resumed: the crops go on where they stopped.
    steps = []
    resumed = configs("resumed", checkpoint_every_epochs=1, epochs=3)
    train_together(
        resumed,
        group_dir=str(tmp_path / "g1"),
        on_event=lambda e: steps.append(e["step"]) if e["kind"] == "step" else None,
        should_stop=lambda: len(steps) >= 5,
    )
    train_together(resumed, group_dir=str(tmp_path / "g1"))
    straight = configs("straight", epochs=3)
    train_together(straight, group_dir=str(tmp_path / "g2"))
    for a, b in zip(straight, resumed):
        for name, want in _tensors(a).items():
            torch.testing.assert_close(_tensors(b)[name], want, rtol=1e-12, atol=1e-14)


def test_an_fgvc_run_alone_resumes_its_crops_exactly(base, tmp_path, float64, fgvc):
    point = replace(base, data=f"fgvc:{fgvc}", protocol="final", epochs=3, seed=2)
    straight = replace(point, output_dir=str(tmp_path / "straight"))
    train_vit(straight)
    resumed = replace(point, output_dir=str(tmp_path / "resumed"), checkpoint_every_epochs=1)
    steps = []
    train_vit(
        resumed,
        on_event=lambda e: steps.append(e["step"]) if e["kind"] == "step" else None,
        should_stop=lambda: len(steps) >= 5,
    )
    torch.manual_seed(99)  # a resumed run starts from another global RNG state
    assert train_vit(resumed)["resumed_from"] == 5
    for name, want in _tensors(straight).items():
        torch.testing.assert_close(_tensors(resumed)[name], want, rtol=1e-12, atol=1e-14)


def test_groups_split_what_cannot_share_a_pass(base):
    grid = [
        replace(base, lr=1e-2),
        replace(base, lr=1e-3, seed=4),
        replace(base, method="vpt-deep", method_options={"vpt_length": 4}),
        replace(base, method="vpt-deep", method_options={"vpt_length": 4}, lr=1e-3),
        replace(base, method="vpt-deep", method_options={"vpt_length": 8}),
        replace(base, img_size=32, model_kwargs={**base.model_kwargs, "img_size": 32}),
        replace(base, method="full"),
        replace(base, method="vpt-deep", method_options={"vpt_dropout": 0.1}),
        replace(base, checkpoint=None, pretrained=False),
        replace(base, checkpoint=None, pretrained=False, seed=1),
    ]
    groups = group_configs(grid)
    sizes = [[grid.index(c) for c in g] for g in groups]
    # Same backbone and method with other lr / seed share; another prompt length, input size,
    # full fine-tuning, dropout, or a random-init backbone of another seed train apart.
    assert sizes == [[0, 1], [2, 3], [4], [5], [6], [7], [8], [9]]
    with pytest.raises(PeftkitError, match="cannot share a pass"):
        train_together([grid[0], grid[4]])


def test_a_diverging_configuration_fails_alone_and_the_others_end_as_alone(base, tmp_path):
    good, bad = _pair(base, tmp_path / "together", "lora", r=2)
    bad = replace(bad, lr=1e36)  # its weights overflow float32 within a few steps
    results = train_together([good, bad], group_dir=str(tmp_path / "group"))
    assert results[1]["status"] == "failed" and results[1]["top1"] is None
    assert "NaN/inf for 3 steps in a row" in results[1]["error"]
    assert results[0]["status"] == "done" and results[0]["steps"] == 12
    solo = replace(good, output_dir=str(tmp_path / "alone"))
    alone = train_vit(solo)
    for name, want in _tensors(solo).items():
        torch.testing.assert_close(_tensors(good)[name], want, rtol=1e-5, atol=1e-6)
    assert results[0]["top1"] == pytest.approx(alone["top1"])


def test_an_interrupted_group_resumes_every_configuration_where_it_stopped(base, tmp_path, float64):
    def configs(where):
        return _pair(replace(base, checkpoint_every_epochs=1), tmp_path / where, "vpt-deep+ssf")

    train_together(configs("straight"), group_dir=str(tmp_path / "g1"))
    steps = []
    stopped = train_together(
        configs("resumed"),
        group_dir=str(tmp_path / "g2"),
        on_event=lambda e: steps.append(e["step"]) if e["kind"] == "step" else None,
        should_stop=lambda: len(steps) >= 5,
    )
    assert {r["status"] for r in stopped} == {"stopped"}
    assert not (tmp_path / "resumed" / "a" / "results.json").exists()
    resumed = train_together(configs("resumed"), group_dir=str(tmp_path / "g2"))
    assert {r["resumed_from"] for r in resumed} == {5} and len(resumed) == 3
    for a, b in zip(configs("straight"), configs("resumed")):
        got, want = _tensors(b), _tensors(a)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14)


@pytest.fixture
def replayed(monkeypatch):
    """The captured-step path on the CPU: graphs planned as on one GPU, and each "replay" runs the
    captured body eagerly with the capture's context held (the routing its kernels read).
    Yields the list of captures."""
    captures = []

    class Replay:
        def __init__(self, step):
            self.step = step

        def replay(self):
            with self.step.context():
                self.step.losses = self.step._body(warmup=False)

    def capture(self, inputs):
        captures.append(self)
        self.static, self.graph = clone_batch(inputs), Replay(self)

    monkeypatch.setattr(engine, "graph_plan", lambda *args, **kwargs: (True, None))
    monkeypatch.setattr(GraphedStep, "_capture", capture)
    yield captures


@pytest.mark.parametrize(
    "method,options", [("lora", {"r": 2}), ("vpt-deep+ssf", {"vpt_length": 2})]
)
def test_the_captured_step_trains_configurations_together_as_each_alone(
    base, tmp_path, float64, replayed, method, options
):
    configs = _pair(base, tmp_path / "together", method, **options)
    together = train_together(configs, group_dir=str(tmp_path / "group"))
    assert len(replayed) == 1  # one capture served every step
    for k, config in enumerate(configs):
        solo = replace(config, output_dir=str(tmp_path / f"alone{k}"))
        alone = train_vit(solo)
        for name, want in _tensors(solo).items():
            torch.testing.assert_close(_tensors(config)[name], want, rtol=1e-9, atol=1e-11)
        assert together[k]["top1"] == alone["top1"]


def test_under_captured_steps_a_diverging_configuration_fails_alone_and_the_rest_is_recaptured(
    base, tmp_path, replayed
):
    good, bad = _pair(base, tmp_path / "together", "lora", r=2)
    bad = replace(bad, lr=1e36)
    results = train_together([good, bad], group_dir=str(tmp_path / "group"))
    assert results[1]["status"] == "failed" and "3 steps in a row" in results[1]["error"]
    assert results[0]["status"] == "done" and results[0]["steps"] == 12
    # Captured for both, then again for the good one alone once the other failed.
    mine = len(replayed[-1].params)
    assert [len(step.params) for step in replayed] == [2 * mine, mine]
    solo = replace(good, output_dir=str(tmp_path / "alone"))
    alone = train_vit(solo)
    for name, want in _tensors(solo).items():
        torch.testing.assert_close(_tensors(good)[name], want, rtol=1e-5, atol=1e-6)
    assert results[0]["top1"] == pytest.approx(alone["top1"])
