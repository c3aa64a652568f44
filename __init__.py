"""peftkit: parameter-efficient fine-tuning for diffusion models and vision transformers."""

__version__ = "0.1.0"
