import torch

from peftkit.vision.methods import VisionAdapter, ViTMethodConfig


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
