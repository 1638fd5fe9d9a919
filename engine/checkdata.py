"""Labelled images for a run's checks (export parity, the INT8 gate, the benchmark's Dice), and which they are."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from engine import config, runs
from engine.data import Sample, image_folder, scan_dataset, sorted_folders
from engine.errors import DatasetError


def run_folder(run: str | Path | None) -> Path:
    """A run's folder from its id, `demo`/`latest`, or the folder itself (pages pass the folder they listed)."""
    if isinstance(run, Path):
        runs.read_record(run)  # RunNotFound if it is not a run folder
        return run
    return runs.resolve_run(run)


CHECK_FOLDER = "check"  # a small labelled set a shipped run carries for its own checks (the demo's)
GENERATED_CHECK_IMAGES = 24


def dataset_for_run(folder: Path, data: str | Path | None = None) -> Path:
    """The dataset folder a run was trained on (or `data`); DatasetError with what to do if it is gone."""
    if data is None:
        data = runs.read_record(folder).dataset.path
        if not data:
            raise _missing(f"run {folder.name} does not record its dataset", "; pass --data DIR")
    data = Path(data) if Path(data).is_absolute() else config.ROOT / data  # shipped runs record repo paths
    if sorted_folders(data) is not None:
        raise DatasetError(f"{data} is sorted by verdict, without masks: these checks compare Dice, which needs "
                           "masks; pass a folder with images/ and masks/, or leave --data out")
    if not image_folder(data).is_dir():
        raise _missing(f"dataset {data} not found", " (needed for the parity and accuracy checks); restore it, "
                                                     "or point to a copy with --data DIR")
    return data


def _missing(what: str, advice: str) -> DatasetError:
    """A DatasetError that also carries what is missing alone (check_data's notes start with it)."""
    err = DatasetError(what + advice)
    err.missing = what
    return err


@contextmanager
def check_data(folder: Path, data: str | Path | None = None) -> Iterator[tuple[Path, str, bool]]:
    """Labelled images for export's parity and accuracy checks: (folder, a sentence saying which, whether they
    stand in for the user's labelled images).

    `--data` if given, else the run's own dataset; if that has moved: the run's shipped check set, else
    images generated for the purpose (deleted afterwards), so an export never fails for a missing folder. Where
    the images hold no labelled defect (a set of good parts), defects are painted onto some of them, as the run's
    validation did, so that Dice compares defects rather than only false-alarm pixels.
    """
    if data is not None:
        with _with_defects(folder, dataset_for_run(folder, data), f"checked on {data} (--data)") as found:
            yield found
        return
    try:
        dataset = dataset_for_run(folder)
    except DatasetError as err:
        dataset, missing = None, err.missing
    if dataset is not None:  # outside the try: an error of the caller's body must not land in that except
        with _with_defects(folder, dataset, f"checked on the run's dataset {dataset}") as found:
            yield found
        return
    ask = "pass --data DIR to check on your own labelled images"
    if (folder / CHECK_FOLDER / "images").is_dir():
        yield folder / CHECK_FOLDER, f"{missing}: checked on the {CHECK_FOLDER}/ images the run ships with; {ask}", True
        return
    from engine import synthset

    with tempfile.TemporaryDirectory(prefix="export-check-") as tmp:
        synthset.generate_dataset(tmp, GENERATED_CHECK_IMAGES, seed=0, workers=1)
        yield Path(tmp), f"{missing}: checked on {GENERATED_CHECK_IMAGES} generated images, not on your data; {ask}", True


PAINTED_CHECK_IMAGES = 48


@contextmanager
def _with_defects(folder: Path, dataset: Path, note: str) -> Iterator[tuple[Path, str, bool]]:
    """The dataset as it is where an image holds a labelled defect, else a temporary copy of some of its images,
    about half of them with the run's kinds of defect painted on."""
    if any(s.defective for s in scan_dataset(dataset, validate=False).samples):
        yield dataset, note, False
        return
    from engine.paint import DEFECTS_PER_IMAGE, params_for
    from engine.paintset import paint_check_set

    trained = runs.read_record(folder)  # painted as the run's validation was
    params = params_for(trained.param("paint_types"), size=trained.param("paint_size", 0.0),
                        count=trained.param("paint_count") or DEFECTS_PER_IMAGE)
    with tempfile.TemporaryDirectory(prefix="export-check-") as tmp:
        n_images, painted = paint_check_set(dataset, tmp, PAINTED_CHECK_IMAGES, params)
        yield Path(tmp), (f"{note}; none of its images holds a labelled defect, so the checks ran on {n_images} of "
                          f"them, {painted} with defects painted on (a stand-in for real defects, as the run's "
                          "validation used)"), True


def pick_samples(data: Path, splits: tuple[str, ...], limit: int | None = None) -> list[Sample]:
    """Samples of the first split (in order) that holds a defect, else of the first that has any, evenly spread
    over it and at most `limit`."""
    report = scan_dataset(data, validate=False)
    found = [report.split(split) for split in splits if report.split(split)]
    if not found:
        raise DatasetError(f"{data}: no images in split(s) {', '.join(splits)} (found {report.counts()})")
    samples = next((group for group in found if any(s.defective for s in group)), found[0])
    if limit and len(samples) > limit:
        samples = [samples[i] for i in np.linspace(0, len(samples) - 1, limit).round().astype(int)]
    return samples


NO_DEFECT_NOTE = "none of these images holds a defect, so Dice here compares false-alarm pixels only"
