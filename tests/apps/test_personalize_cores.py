"""The Personalize tab's method dropdown lists every core of the registry (plus Textual
Inversion), and each entry becomes a concept run of that core."""

from peftkit.apps.personalize_tab import METHODS
from peftkit.common_kernels.registry import core, core_names
from peftkit.diffusion.dreambooth import ConceptConfig


def test_method_dropdown_lists_every_registered_core_and_each_trains_that_core():
    cores = {label: m for label, m in METHODS.items() if m != "ti"}
    assert sorted(cores.values()) == core_names()
    assert list(METHODS)[0] == "LoRA" and METHODS["Textual Inversion"] == "ti"
    assert {"LoRA", "LoKr", "OFT", "DoRA", "LoHa", "BOFT"} <= set(cores)
    for label, method in cores.items():
        config = ConceptConfig(instance_prompt="a photo of sks toy", method=method)
        assert type(config.unet_adapter()) is core(method).config, label
