"""The CUDA paths: training with fp16 autocast and loader workers, and inference that agrees with the CPU.

CI has no GPU, so these skip there; `benchmarks/gpu_check.sh` runs them on a GPU machine.
"""

import numpy as np
import pytest
import torch

from engine import config, runs
from engine.data import load_pair, scan_dataset
from engine.inference import Predictor
from engine.model import load_checkpoint
from engine.train import TrainConfig, train

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"), pytest.mark.slow]


def test_cuda_training_uses_fp16_autocast_and_saves_cpu_loadable_checkpoints(tiny_dataset) -> None:
    run_id = train(TrainConfig(data=str(tiny_dataset), epochs=2, base=8, depth=2, crop=32, batch_size=8,
                               steps_per_epoch=4, device="cuda", name="cuda"))
    folder = config.RUNS_DIR / run_id
    info = runs.read_run_json(folder)
    assert info["status"] == "completed" and info["device"].startswith("cuda")
    assert np.isfinite([row["train_loss"] for row in runs.read_metrics(folder)]).all()
    model, meta = load_checkpoint(runs.checkpoint_path(folder, "best"), "cpu")
    assert next(model.parameters()).device.type == "cpu" and meta["epoch"] in (1, 2)


def test_cuda_and_cpu_predictions_agree(trained_run: str, tiny_dataset) -> None:
    folder = config.RUNS_DIR / trained_run
    cpu, gpu = Predictor(folder, device="cpu"), Predictor(folder, device="cuda")
    for sample in scan_dataset(tiny_dataset).split("val")[:4]:
        image, _ = load_pair(sample)
        # TF32 convolutions on the GPU differ from the CPU in the last bits only.
        assert np.abs(cpu.predict_proba(image) - gpu.predict_proba(image)).max() < 1e-2


def test_cuda_training_cuts_batches_on_the_gpu(tiny_dataset) -> None:
    run_id = train(TrainConfig(data=str(tiny_dataset), epochs=1, base=8, depth=2, crop=32, batch_size=8,
                               steps_per_epoch=4, device="cuda", name="cuda-batches"))
    info = runs.read_run_json(config.RUNS_DIR / run_id)
    assert info["status"] == "completed" and info["params"]["batches"] == "device"
