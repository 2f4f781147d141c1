"""fedlora: federated LoRA fine-tuning of pretrained transformers on Flower + Ray."""

__version__ = "0.1.0"
