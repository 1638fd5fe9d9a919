"""What the app and the command line say agrees with itself and with what happened (issue 39, items 5, 7 and 9)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import config, readiness, registry, runs, runstore
from engine.__main__ import main
from engine.train import TrainConfig, train


@pytest.fixture(scope="module")
def generated_run(tiny_dataset: Path) -> str:
    """A run trained on generated images (the tiny set), to be tuned on generated images too."""
    return train(TrainConfig(data=str(tiny_dataset), epochs=1, base=8, depth=2, crop=32, batch_size=8,
                             steps_per_epoch=2, name="wording", init="none"))


def test_the_kind_of_images_a_set_holds(tiny_dataset: Path, tmp_path: Path) -> None:
    assert runstore.images_kind(tiny_dataset) == "generated images"  # its manifest is the generator's
    own = tmp_path / "parts"
    (own / "images").mkdir(parents=True)
    (own / "manifest.csv").write_text("id,split\n")
    assert runstore.images_kind(own) == "real images"
    assert runstore.images_kind(own, source="painted") == "painted defects"
    registry.upsert_dataset("kind-check", str(own.resolve()), "hash", 0, 0, 0, source="painted")
    assert runstore.images_kind(own) == "painted defects"  # by the source it was registered with


def test_a_run_tuned_on_generated_images_never_says_real(generated_run: str, tiny_dataset: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["tune", "--run", generated_run, "--data", str(tiny_dataset), "--split", "test"]) == 0
    out = capsys.readouterr().out
    info = runs.read_run_json(config.RUNS_DIR / generated_run)
    assert info.get("tuned_on"), "the tuning did not decide; pick a set where it does"
    assert "real images" not in out and "(tuned on generated images)" in out, out
    assert info["tuned_on"]["images"] == "generated images"
    assert info["ready"] or info["ready_reason"].startswith("tuned on generated images: "), info["ready_reason"]
    row = next(r for r in runstore.overview() if r["run_id"] == generated_run)
    assert row["validated_on"] == "generated images"  # the Runs table says the same
    assert all("real images" not in step for step in readiness.next_steps(info))


def test_generate_says_its_splits_in_words_not_as_a_python_dict(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["generate", "--out", str(tmp_path / "words"), "--count", "10", "--size", "64", "--seed", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "{" not in line and "'" not in line and ", test " in line and "train " in line, line
