"""UNetTiny: a compact U-Net for binary defect segmentation, and its checkpoint format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.errors import EngineError, RunNotFound
from engine.presets import PRESETS
from engine.storage import atomic_write_bytes


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by batch norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNetTiny(nn.Module):
    """U-Net with `depth` down-sampling levels; channels double per level from `base`. Outputs logits.
    With `stem=2` the U-Net works at half resolution behind a strided convolution, and one light convolution on
    the up-sampled features and the image itself restores full resolution: about a quarter of the arithmetic and
    of the memory traffic of full-resolution 16-channel levels, for twice the field of view."""

    def __init__(self, in_channels: int = 1, base: int = 16, depth: int = 4, stem: int = 1) -> None:
        super().__init__()
        if stem not in (1, 2):
            raise ValueError(f"stem must be 1 or 2, not {stem}")
        self.in_channels, self.base, self.depth, self.stem_factor = in_channels, base, depth, stem
        widths = [base * 2**i for i in range(depth + 1)]
        first = in_channels
        if stem == 2:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, base, 3, stride=2, padding=1, bias=False),
                                      nn.BatchNorm2d(base), nn.ReLU(inplace=True))
            self.refine = nn.Sequential(nn.Conv2d(base + in_channels, base // 2, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(base // 2), nn.ReLU(inplace=True))
            first = base
        self.encoder = nn.ModuleList([ConvBlock(first, widths[0])])
        self.encoder.extend(ConvBlock(widths[i], widths[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.decoder = nn.ModuleList(ConvBlock(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0] if stem == 1 else base // 2, 1, 1)

    @property
    def stride(self) -> int:
        """Input height and width must be multiples of this."""
        return 2**self.depth * self.stem_factor

    @property
    def arch(self) -> dict[str, int]:
        """The constructor's arguments, as checkpoints record them (stem only where it is not 1, so that older
        checkpoints and the pre-trained weights compare equal)."""
        arch = {"in_channels": self.in_channels, "base": self.base, "depth": self.depth}
        return arch if self.stem_factor == 1 else {**arch, "stem": self.stem_factor}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x
        if self.stem_factor == 2:
            x = self.stem(x)
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for up, block in zip(self.up, self.decoder):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        if self.stem_factor == 2:
            x = nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = self.refine(torch.cat([x, image], dim=1))
        return self.head(x)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_checkpoint(path: str | Path, model: UNetTiny, meta: dict[str, Any]) -> Path:
    """Save weights plus everything needed to use them (architecture, normalisation, threshold) atomically."""
    import io

    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "arch": model.arch,
        "meta": meta,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[UNetTiny, dict[str, Any]]:
    """Load a checkpoint saved by save_checkpoint; returns the model in eval mode and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise RunNotFound(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        model = UNetTiny(**payload["arch"])
        model.load_state_dict(payload["state_dict"])
    except Exception as err:  # corrupt or foreign file
        raise RunNotFound(f"checkpoint {path} is unreadable ({type(err).__name__}); re-train or pick another epoch") from err
    return model.to(device).eval(), payload.get("meta", {})


# Weights pre-trained on the generator's images (scripts/make_pretrained.sh rebuilds them), fp16 to stay small.
PRETRAINED_PATH = Path(__file__).resolve().parent / "pretrained" / "unettiny-b16-d4.pth"
PRETRAINED_ARCH = {"in_channels": 1, **PRESETS["balanced"]}


def save_pretrained(checkpoint: str | Path, path: str | Path = PRETRAINED_PATH, note: str = "") -> Path:
    """Store a run's checkpoint as the shipped starting point: fp16 weights, architecture and provenance."""
    import io

    model, meta = load_checkpoint(checkpoint)
    payload = {
        "state_dict": {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()},
        "arch": model.arch,
        "meta": {"source_run": meta.get("run_id"), "epoch": meta.get("epoch"), "note": note},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_pretrained(model: UNetTiny, path: str | Path = PRETRAINED_PATH) -> dict[str, Any]:
    """Copy the shipped pre-trained weights into model (in place); EngineError if the architectures differ."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"pre-trained weights not found at {path}; rebuild them with scripts/make_pretrained.sh "
                          "or train from scratch with --init none")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    arch = model.arch
    if payload["arch"] != arch:
        raise EngineError(f"the pre-trained weights are for UNetTiny {payload['arch']}, this run builds {arch}; "
                          "use the default preset, or --init none to train from scratch")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
    return payload.get("meta", {})
