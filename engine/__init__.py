"""Metal-surface defect segmentation engine: data, model, training, inference, export, registry."""

__version__ = "0.1.0"
