import copy

import pytest
import torch
from torch import nn

from peftkit.common_kernels import (
    AdaptedLayer,
    BOFTConfig,
    DoRAConfig,
    KronConfig,
    LoHaConfig,
    LoRAConfig,
    OFTConfig,
    PeftkitError,
    core,
    inject,
    routing,
)

from .conftest import TwoLayer, rel

CONFIGS = {
    "lora": lambda: LoRAConfig(targets=["lin", "conv"], r=4, alpha=8),
    "oft": lambda: OFTConfig(targets=["lin", "conv"], block_size=4),
    "kron": lambda: KronConfig(targets=["lin", "conv"], r=2, alpha=4),
    "dora": lambda: DoRAConfig(targets=["lin", "conv"], r=4, alpha=8),
    "loha": lambda: LoHaConfig(targets=["lin", "conv"], r=2, alpha=4),
    "boft": lambda: BOFTConfig(targets=["lin", "conv"], block_size=2, n_butterfly_factor=2),
    "diag-oft": lambda: core("diag-oft").make_config(
        ["lin", "conv"], block_size=4, constraint=0.01, rescaled=True
    ),
    "lycoris-boft": lambda: core("lycoris-boft").make_config(
        ["lin", "conv"], block_size=6, rescaled=True
    ),
}


def randomize(handle, std=0.3):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


@pytest.fixture
def model32():
    torch.manual_seed(0)
    return TwoLayer()


@pytest.fixture
def inputs32():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 16, generator=g), torch.randn(5, 4, 8, 8, generator=g)


@pytest.mark.parametrize("method", CONFIGS)
def test_merge_equals_unmerged_and_unmerge_restores_weights(model32, inputs32, method):
    original = copy.deepcopy(model32.state_dict())
    handle = inject(model32, CONFIGS[method]())
    randomize(handle)
    unmerged = model32(*inputs32)
    handle.merge()
    merged = model32(*inputs32)
    for a, b in zip(merged, unmerged):
        assert rel(a, b) < 1e-5
    handle.unmerge()
    for name in ("lin", "conv"):
        w = handle.layers[name].base.weight
        assert torch.allclose(w, original[f"{name}.weight"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", CONFIGS)
def test_unload_restores_the_original_modules_bit_for_bit(model32, method):
    original = copy.deepcopy(model32.state_dict())
    flags = {n: p.requires_grad for n, p in model32.named_parameters()}
    handle = inject(model32, CONFIGS[method]())
    randomize(handle)
    handle.unload()
    assert not any(isinstance(m, AdaptedLayer) for m in model32.modules())
    state = model32.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in state)
    assert flags == {n: p.requires_grad for n, p in model32.named_parameters()}


def test_inject_freezes_the_base_and_only_adapter_params_train(model32):
    handle = inject(model32, LoRAConfig(targets=["lin"], r=2))
    trainable = {id(p) for p in model32.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in handle.trainable_parameters()}
    assert handle.num_parameters() == 2 * 16 + 24 * 2


def test_mixed_batch_equals_each_row_alone(model32, inputs32):
    handles = [inject(model32, CONFIGS[m](), name=m) for m in CONFIGS]
    for h in handles:
        randomize(h)
    names = list(CONFIGS)
    ids = [0, 1, 2, -1, 1]
    with routing(model32, ids, names):
        mixed = model32(*inputs32)
    for row, k in enumerate(ids):
        for h in handles:
            h.disable()
        if k >= 0:
            handles[k].enable()
        alone = model32(inputs32[0][row : row + 1], inputs32[1][row : row + 1])
        for a, b in zip(mixed, alone):
            assert rel(a[row : row + 1], b) < 1e-6


def test_routing_rejects_unknown_names_and_bad_ids(model32, inputs32):
    inject(model32, LoRAConfig(targets=["lin"], r=2), name="dog")
    with pytest.raises(PeftkitError, match="unknown adapters"):
        with routing(model32, [0], ["cat"]):
            pass
    with pytest.raises(PeftkitError, match="adapter_ids"):
        with routing(model32, [3], ["dog"]):
            pass


@pytest.mark.parametrize("apply", ["factored", "weight"])
def test_two_adapters_compose_and_scale_and_disable(model32, inputs32, apply):
    base_out = model32(*inputs32)
    lora = inject(model32, LoRAConfig(targets=["lin"], r=2, apply=apply), name="a")
    oft = inject(model32, OFTConfig(targets=["lin"], block_size=4), name="b")
    randomize(lora)
    randomize(oft)
    x = inputs32[0]
    layer = lora.layers["lin"]
    R = torch.block_diag(*oft.layers["lin"].deltas["b"].rotation())
    A, B = layer.deltas["a"].A, layer.deltas["a"].B
    W, b = layer.base.weight, layer.base.bias
    expected = x @ (W @ R).T + b + 0.5 * x @ (B @ A).T
    lora.set_scale(0.5)
    assert rel(model32(*inputs32)[0], expected) < 1e-5
    lora.merge()
    oft.merge()
    assert rel(model32(*inputs32)[0], expected) < 1e-5
    lora.unmerge()
    oft.unmerge()
    lora.set_scale(0.0)
    oft.disable()
    assert rel(model32(*inputs32)[0], base_out[0]) < 1e-6


def test_no_match_error_lists_module_names(model32):
    with pytest.raises(PeftkitError, match=r"no module matches targets=\['to_q'\].*'lin'"):
        inject(model32, LoRAConfig(targets=["to_q"]))


def test_regex_and_type_targets():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(2, 2, 1), nn.Linear(4, 4))
    assert set(inject(copy.deepcopy(model), LoRAConfig(targets=["re:[02]"], r=1)).layers) == {
        "0",
        "2",
    }
    assert set(inject(copy.deepcopy(model), LoRAConfig(target_types=["Conv2d"], r=1)).layers) == {
        "1"
    }
    assert set(
        inject(copy.deepcopy(model), LoRAConfig(target_types=["Linear"], exclude=["2"], r=1)).layers
    ) == {"0"}


def test_bf16_base_keeps_fp32_adapter_params():
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    handle = inject(model, LoRAConfig(targets=["0"], r=2))
    randomize(handle)
    assert all(p.dtype == torch.float32 for p in handle.trainable_parameters())
    y = model(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 for p in handle.trainable_parameters()
    )


def test_config_round_trips_through_json():
    from peftkit.common_kernels import AdapterConfig

    for make in CONFIGS.values():
        config = make()
        assert AdapterConfig.from_json(config.to_json()) == config
    with pytest.raises(PeftkitError, match="unknown adapter core"):
        AdapterConfig.from_dict({"method": "nope"})


def test_weight_space_lora_folds_into_a_rotated_conv_kernel(model32, inputs32):
    """Conv OFT rotates the kernel, so a weight-space LoRA on the same conv may fold in too."""
    oft = inject(model32, OFTConfig(targets=["conv"], block_size=4), name="r")
    lora = inject(model32, LoRAConfig(targets=["conv"], r=2, apply="weight"), name="l")
    randomize(oft)
    randomize(lora)
    layer = lora.layers["conv"]
    W = layer.base.weight
    R = torch.block_diag(*oft.layers["conv"].deltas["r"].rotation())
    d = layer.deltas["l"]
    kernel = (W.flatten(1) @ R + d.B.flatten(1) @ d.A.flatten(1)).reshape(W.shape)
    expected = torch.nn.functional.conv2d(inputs32[1], kernel, layer.base.bias, padding=1)
    assert rel(model32(*inputs32)[1], expected) < 1e-5


def test_grouped_lora_routing_equals_separate_forwards_and_trains_each_adapter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 6))
    names = ["a", "b", "c", "d"]
    handles = [
        inject(model, LoRAConfig(targets=["0", "2"], r=2 if n != "d" else 3), name=n) for n in names
    ]
    for h in handles:
        randomize(h)
    x = torch.randn(7, 5, 12)
    assert_routed_equals_rows_alone(
        model, handles, [0, 1, 2, -1, 3, 1, 0], x, out_tol=1e-6, grad_tol=1e-5
    )


def assert_routed_equals_rows_alone(model, handles, ids, x, out_tol, grad_tol):
    """One routed forward + backward of `x` equals each row through its own adapter alone, in
    outputs and in every adapter's gradients (zero for an adapter no row takes)."""
    with routing(model, ids, [h.name for h in handles]):
        mixed = model(x)
    mixed.square().sum().backward()
    grads = {h.name: [p.grad.clone() for p in h.trainable_parameters()] for h in handles}
    for h in handles:
        for p in h.trainable_parameters():
            p.grad = None
    total = 0
    for row, k in enumerate(ids):
        for h in handles:
            h.disable()
        if k >= 0:
            handles[k].enable()
        alone = model(x[row : row + 1])
        assert rel(mixed[row : row + 1], alone) < out_tol
        total = total + alone.square().sum()
    for h in handles:
        h.enable()
    total.backward()
    for h in handles:
        for g, p in zip(grads[h.name], h.trainable_parameters()):
            assert rel(g, torch.zeros_like(g) if p.grad is None else p.grad) < grad_tol, h.name


def test_a_second_adapter_leaves_the_first_trainable(model32):
    first = inject(model32, LoRAConfig(targets=["lin"], r=2), name="first")
    inject(model32, KronConfig(targets=["lin", "conv"], r=2), name="second")
    assert all(p.requires_grad for p in first.trainable_parameters())


def test_remove_adapters_restores_everything_without_the_handles(model32):
    from peftkit.common_kernels import remove_adapters

    original = copy.deepcopy(model32.state_dict())
    lora = inject(model32, LoRAConfig(targets=["lin", "conv"], r=2), name="a")
    inject(model32, OFTConfig(targets=["lin"], block_size=4), name="b")
    randomize(lora)
    lora.merge()
    remove_adapters(model32)
    assert not any(isinstance(m, AdaptedLayer) for m in model32.modules())
    assert not model32._forward_pre_hooks and not model32._forward_hooks
    for k, v in model32.state_dict().items():
        assert torch.allclose(v, original[k], atol=1e-6)
    assert all(p.requires_grad for p in model32.parameters())


@pytest.mark.parametrize(
    "ids, segmented",
    [
        ([0, 0, 1, 1, 2, 2], True),  # equal runs in routing order: one batched GEMM, no gather
        ([0, 1, 1, 2, 2, 2], True),  # unequal runs: one GEMM per run
        ([2, 2, 0, 0, 1, 1], True),  # runs out of order: merged weights gathered
        ([0, 0, -1, -1, 1, 1], True),  # a run with no adapter takes the base weight
        ([0, 1, 2, 0, 1, 2], True),  # classifier-free guidance's two halves
        ([0, 1, 0, 1, 0, 1], False),  # many short runs: the factored grouped pass instead
    ],
)
def test_weight_space_routing_by_runs_equals_each_row_alone(monkeypatch, ids, segmented):
    from peftkit.common_kernels.layer import AdaptedLayer

    calls = []
    original = AdaptedLayer._segmented_forward
    monkeypatch.setattr(
        AdaptedLayer,
        "_segmented_forward",
        lambda self, x, deltas: calls.append(1) or original(self, x, deltas),
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 6, bias=False)).double()
    names = ["a", "b", "c"]
    handles = [
        inject(model, LoRAConfig(targets=["0", "2"], r=2, alpha=3, apply="weight"), name=n)
        for n in names
    ]
    for h in handles:
        randomize(h)
    handles[1].set_scale(0.5)
    # Enough tokens per row that three folded weights cost fewer bytes than the rows' factors.
    x = torch.randn(len(ids), 40, 12, dtype=torch.float64)
    assert_routed_equals_rows_alone(model, handles, ids, x, out_tol=1e-12, grad_tol=1e-12)
    assert bool(calls) == segmented


@pytest.mark.parametrize(
    "ids", [[0, 1, 2], [0, 0, 1, 1, 2, 2], [2, 2, 0, 0, 1, 1], [0, 0, -1, -1, 1, 1]]
)
def test_routed_lora_runs_with_few_tokens_take_the_prepared_factors(monkeypatch, ids):
    """Few tokens per row against wide layers: the runs go through two batched GEMMs over the
    prepared factors (out-of-order and adapter-less runs included), no folded weight is formed,
    and every row equals itself through its own adapter alone."""
    from peftkit.common_kernels.lora import LoRADelta

    factored = []
    original = LoRADelta.segmented_delta
    monkeypatch.setattr(LoRADelta, "segmented_delta", lambda *a: factored.append(1) or original(*a))
    folded = []
    monkeypatch.setattr(LoRADelta, "routed_weights", lambda *a: folded.append(1))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40), nn.GELU(), nn.Linear(40, 32)).double()
    handles = [
        inject(model, LoRAConfig(targets=["0", "2"], r=2, alpha=3, apply="weight"), name=n)
        for n in "abc"
    ]
    for h in handles:
        randomize(h)
    handles[1].set_scale(0.5)
    x = torch.randn(len(ids), 2, 48, dtype=torch.float64)
    assert_routed_equals_rows_alone(model, handles, ids, x, out_tol=1e-12, grad_tol=1e-12)
    assert len(factored) == 2 and not folded  # both layers, one routed forward


ROUTED_CORES = {
    "kron-weight": lambda t: KronConfig(targets=t, r=2, alpha=3, apply="weight"),
    "kron-factored": lambda t: KronConfig(targets=t, r=2, alpha=3, apply="factored"),
    "loha": lambda t: LoHaConfig(targets=t, r=2, alpha=3),
    "dora": lambda t: DoRAConfig(targets=t, r=2, alpha=3),
    "oft": lambda t: OFTConfig(targets=t, block_size=2),
    "boft": lambda t: BOFTConfig(targets=t, block_size=2, n_butterfly_factor=2),
    "diag-oft": lambda t: core("diag-oft").make_config(t, block_size=2, rescaled=True),
    "lycoris-boft": lambda t: core("lycoris-boft").make_config(t, block_size=6, rescaled=True),
}


def count_calls(monkeypatch, name):
    calls = []
    original = getattr(AdaptedLayer, name)
    monkeypatch.setattr(AdaptedLayer, name, lambda self, *a: calls.append(1) or original(self, *a))
    return calls


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("ids", [[0, 1, 2, -1, 2, 1, 0], [0, 0, 1, 1, -1, 2, 2]])
@pytest.mark.parametrize("method", [*ROUTED_CORES, "mixed"])
def test_every_core_routes_rows_through_per_adapter_weights_in_one_segmented_pass(
    monkeypatch, method, ids, kind
):
    """Scattered rows are sorted into runs; each run goes through its adapter's folded weight, and
    no adapter's full pass is computed and masked."""
    segmented = count_calls(monkeypatch, "_segmented_forward")
    masked = count_calls(monkeypatch, "_masked_forward")
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 8)).double()
        x = torch.randn(len(ids), 5, 12, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 6, 1))
        model = model.double()
        x = torch.randn(len(ids), 4, 5, 5, dtype=torch.float64)
    targets = ["0", "2"]
    if method == "mixed":
        configs = [
            LoRAConfig(targets=targets, r=2, apply="weight"),
            ROUTED_CORES["dora"](targets),
            ROUTED_CORES["boft"](targets),
        ]
    else:
        configs = [ROUTED_CORES[method](targets) for _ in range(3)]
    handles = [inject(model, c, name=f"a{i}") for i, c in enumerate(configs)]
    for h in handles:
        randomize(h)
    handles[1].set_scale(0.5)
    assert_routed_equals_rows_alone(model, handles, ids, x, out_tol=1e-12, grad_tol=1e-12)
    assert segmented and not masked


def test_lora_with_input_dropout_routes_by_masking_each_adapters_rows(monkeypatch):
    masked = count_calls(monkeypatch, "_masked_forward")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 6)).double()
    handles = [
        inject(model, LoRAConfig(targets=["0", "2"], r=2, dropout=0.5), name="drop"),
        inject(model, KronConfig(targets=["0", "2"], r=2), name="kron"),
    ]
    for h in handles:
        randomize(h)
    model.eval()  # dropout off, so each row alone is the reference
    x = torch.randn(4, 5, 12, dtype=torch.float64)
    assert_routed_equals_rows_alone(model, handles, [0, 1, 1, 0], x, out_tol=1e-12, grad_tol=1e-12)
    assert masked


def test_prepared_lora_factors_give_exact_outputs_and_gradients_for_one_joined_and_routed():
    """Through the model, weight-space LoRA layers use factors cast and scaled for all layers at
    once before the forward: one adapter, two joined, and rows routed over three."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 10)).double()
    handles = [
        inject(model, LoRAConfig(targets=["0", "2"], r=2, alpha=a, apply="weight"), name=n)
        for n, a in (("a", 2.0), ("b", 3.0), ("c", 5.0))
    ]
    for h, scale in zip(handles, (1.0, 0.5, -0.7)):
        randomize(h)
        h.set_scale(scale)
    seen = []
    model[2].register_forward_hook(
        lambda m, a, o: seen.append(all(m.deltas[n]._batched is not None for n in m.active))
    )

    def reference(x, active):
        h = x
        for layer in (model[0], model[2]):
            W = layer.base.weight + sum(
                layer.deltas[n].scale
                * layer.deltas[n].scaling
                * layer.deltas[n].B
                @ layer.deltas[n].A
                for n in active
            )
            h = h @ W.T + layer.base.bias
            h = torch.nn.functional.gelu(h) if layer is model[0] else h
        return h

    x = torch.randn(3, 4, 12, dtype=torch.float64)
    params = [p for h in handles for p in h.trainable_parameters()]
    for active in (["a"], ["a", "b"]):
        for h in handles:
            (h.enable if h.name in active else h.disable)()
        y, expected = model(x), reference(x, active)
        assert rel(y, expected) < 1e-12
        for g, e in zip(
            torch.autograd.grad(y.square().sum(), params, allow_unused=True),
            torch.autograd.grad(expected.square().sum(), params, allow_unused=True),
        ):
            assert (g is None) == (e is None) and (g is None or rel(g, e) < 1e-12)
    for h in handles:
        h.enable()
    assert_routed_equals_rows_alone(model, handles, [0, 1, 2], x, out_tol=1e-12, grad_tol=1e-12)
    assert all(seen) and len(seen) > 4


def test_dora_routed_by_runs_takes_the_segmented_path_and_equals_each_row_alone(monkeypatch):
    calls = []
    original = AdaptedLayer._segmented_forward
    monkeypatch.setattr(
        AdaptedLayer,
        "_segmented_forward",
        lambda self, x, deltas: calls.append(1) or original(self, x, deltas),
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 6)).double()
    handles = [inject(model, DoRAConfig(targets=["0", "2"], r=2, alpha=3), name=n) for n in "abc"]
    for h in handles:
        randomize(h)
        with torch.no_grad():
            for name, p in h.named_parameters():
                if name.endswith("magnitude"):
                    p.add_(1.0)
    handles[1].set_scale(0.5)
    ids = [2, 2, 0, 0, -1, 1]
    x = torch.randn(len(ids), 5, 12, dtype=torch.float64)
    assert_routed_equals_rows_alone(model, handles, ids, x, out_tol=1e-12, grad_tol=1e-12)
    assert calls


@pytest.mark.parametrize("apply", ["factored", "weight"])
def test_active_lora_adapters_join_into_one_gemm_pair_with_exact_outputs_and_gradients(
    monkeypatch, apply
):
    from peftkit.common_kernels.lora import LoRADelta

    calls = []
    original = LoRADelta.joined_factors
    monkeypatch.setattr(
        LoRADelta, "joined_factors", staticmethod(lambda ds: calls.append(len(ds)) or original(ds))
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10)).double()
    handles = [
        inject(model, LoRAConfig(targets=["0"], r=2, alpha=a, apply=apply), name=n)
        for n, a in (("a", 2.0), ("b", 3.0), ("c", 5.0))
    ]
    handles.append(inject(model, LoRAConfig(targets=["0"], r=3, apply=apply), name="wide"))
    for h, scale in zip(handles, (1.0, 0.5, -0.7, 0.3)):
        randomize(h)
        h.set_scale(scale)
    x = torch.randn(4, 12, dtype=torch.float64)
    layer = model[0]
    y = layer(x)
    assert calls == [3]  # the three rank-2 adapters join; the rank-3 one runs alone
    deltas = [layer.deltas[h.name] for h in handles]
    W = layer.base.weight + sum(d.scale * d.scaling * d.B @ d.A for d in deltas)
    expected = x @ W.T + layer.base.bias
    assert rel(y, expected) < 1e-12
    params = [p for d in deltas for p in (d.A, d.B)]
    for g, e in zip(
        torch.autograd.grad(y.square().sum(), params),
        torch.autograd.grad(expected.square().sum(), params),
    ):
        assert rel(g, e) < 1e-12


@pytest.mark.parametrize("method", ["lora-weight", "oft", "boft"])
def test_batched_preparation_steps_aside_under_activation_checkpointing(method):
    """A model that recomputes its blocks in backward (the flag diffusers and transformers set)
    gets the gradients of a plain backward: the recomputed layers build their own state."""
    from torch.utils.checkpoint import checkpoint

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.gradient_checkpointing = False

        def forward(self, x):
            run = lambda h: torch.tanh(self.lin(h))  # noqa: E731
            return (
                checkpoint(run, x, use_reentrant=False) if self.gradient_checkpointing else run(x)
            )

    config = {
        "lora-weight": LoRAConfig(targets=["lin"], r=2, apply="weight"),
        "oft": OFTConfig(targets=["lin"], block_size=4),
        "boft": BOFTConfig(targets=["lin"], block_size=2, n_butterfly_factor=2),
    }[method]
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).double()
    handle = inject(model, config)
    randomize(handle)
    x = torch.randn(3, 8, dtype=torch.float64)
    params = handle.trainable_parameters()
    plain = torch.autograd.grad(model(x).square().sum(), params)
    for block in model:
        block.gradient_checkpointing = True
    for g, e in zip(torch.autograd.grad(model(x).square().sum(), params), plain):
        assert rel(g, e) < 1e-12
