"""Generate data: set the generator's parameters, preview a few images, write a named dataset."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app_pages.ui import for_display, run_with_progress
from engine import config, data, importer, paintset, synth, synthset
from engine.drawing import overlay
from engine.errors import EngineError
from engine.imageio import IMAGE_EXTENSIONS
from engine.paint import DEFECTS_PER_IMAGE, EVERY_KIND, PaintParams, params_for
from engine.synth import DEFECT_TYPES

FOLDER, UPLOAD = "a folder on this machine", "images I upload"  # where the good images to paint come from


@st.cache_data(max_entries=16, show_spinner="Rendering the preview…")
def preview_images(size: int, defect_free: float, difficulty: float, tint: float, weights: tuple, seed: int,
                   n: int) -> list[tuple]:
    """Preview samples with their masks outlined (cached per parameter set)."""
    params = synth.SynthParams(size=size, defect_free=defect_free, difficulty=difficulty, tint=tint,
                               defect_weights=dict(weights))
    return [(overlay(image, mask, color=(255, 60, 60), alpha=0.0), types)
            for image, mask, types in synthset.preview(params, n=n, seed=seed)]


@st.cache_data(max_entries=8, show_spinner="Painting the preview…")
def painted_preview(onto: str, seed: int, params: PaintParams) -> list[tuple]:
    """Four of the folder's good images with painted defects (cached per folder, seed and parameters)."""
    return paintset.preview(onto, n=4, seed=seed, params=params)


def parameters() -> dict:
    """The generator's parameters, in the sidebar."""
    with st.sidebar:
        st.header("Parameters")
        name = st.text_input("Dataset name", value="synth-200", key="gen_name",
                             help=f"Written to {config.DATA_DIR.name}/<name>/")
        count = st.number_input("Images", min_value=1, max_value=5000, value=200, step=50, key="gen_count")
        size = st.select_slider("Image size (px)", options=[64, 128, 256, 384, 512], value=256, key="gen_size")
        seed = st.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, key="gen_seed")
        defect_free = st.slider("Defect-free share", 0.0, 1.0, 0.4, 0.05, key="gen_free")
        difficulty = st.slider("Difficulty", 0.0, 1.0, 0.5, 0.05, key="gen_difficulty",
                               help="0: wide, high-contrast defects; 1: thin, faint ones")
        tint = st.slider("Colour-tinted share", 0.0, 1.0, 0.0, 0.05, key="gen_tint")
        st.subheader("Defect types (relative frequency)")
        defaults = synth.SynthParams().defect_weights
        weights = {kind: st.slider(kind, 0.0, 5.0, float(defaults[kind]), 0.5, key=f"gen_w_{kind}")
                   for kind in synth.DEFECT_TYPES}
    return {"name": name, "count": int(count), "size": int(size), "seed": int(seed),
            "defect_free": float(defect_free), "difficulty": float(difficulty), "tint": float(tint),
            "weights": weights}


def preview(p: dict) -> None:
    """The first six images the parameters and seed will write, masks outlined."""
    st.subheader("Preview")
    try:
        previews = preview_images(p["size"], p["defect_free"], p["difficulty"], p["tint"],
                                  tuple(sorted(p["weights"].items())), p["seed"], 6)
    except EngineError as err:
        st.error(str(err))
        st.stop()
    columns = st.columns(6)
    for column, (image, types) in zip(columns, previews):
        column.image(image, caption=", ".join(types) or "defect-free", width="stretch")
    st.caption("Red outlines are the ground-truth masks. These are the first images of the dataset "
               "that the current parameters and seed will write.")


def write_dataset(p: dict) -> None:
    """Write (or replace, when ticked) the generated dataset, with a bar."""
    st.subheader("Write the dataset")
    name = p["name"]
    try:
        out = synthset.dataset_dir(name)
    except EngineError as err:
        st.error(str(err))
        st.stop()
    exists = (out / "images").is_dir()
    overwrite = st.checkbox(f"Replace the existing dataset '{name}'", value=False,
                            key="gen_overwrite") if exists else True
    if exists:
        st.warning(f"A dataset named '{name}' already exists in {out.parent.name}/.")
    if not st.button("Generate", type="primary", disabled=not overwrite, key="gen_go"):
        return
    params = synth.SynthParams(size=p["size"], defect_free=p["defect_free"], difficulty=p["difficulty"],
                               tint=p["tint"], defect_weights=p["weights"])
    result = run_with_progress("Generating…", lambda report: synthset.generate_and_register(
        out, p["count"], seed=p["seed"], params=params, progress=report))
    if result is not None:
        st.success(f"Dataset **{name}**: {result['images']} images ({result['defective']} defective, "
                   f"{result['defect_free']} defect-free; {synthset.splits_text(result['per_split'])}) in "
                   f"{result['seconds']:.1f} s. "
                   f"Content hash {result['dataset'].content_hash}.")
        st.page_link("app_pages/2_Train.py", label="Train a model on it", icon=":material/model_training:")


def good_images(pick: str, sources: dict[str, Path], paint_name: str) -> str:
    """The folder of good images to paint onto: uploaded (kept in a folder of their own), typed, or a dataset."""
    if pick != UPLOAD:
        return st.text_input("Folder of defect-free images", placeholder="/path/to/good/parts",
                             key="paint_folder") if pick == FOLDER else str(sources[pick])
    uploads = st.file_uploader("Defect-free images", type=[e.lstrip(".") for e in IMAGE_EXTENSIONS],
                               accept_multiple_files=True, key="paint_uploads")
    if not uploads:
        return ""
    try:
        folder = paintset.upload_folder(paint_name)
    except EngineError as err:
        st.error(str(err))
        return ""
    kept, problems = paintset.store_good_images([(f.name, f.getvalue()) for f in uploads], folder)
    st.caption(f"{len(kept)} image(s) kept in {folder}: the Train page offers them as dataset "
               f"'{folder.name}' too, to train on directly (defects painted as it trains)")
    for problem in problems:
        st.warning(f"left out: {problem}")
    return str(folder)


def paint_section(seed: int) -> None:
    """Paint the generator's defects onto the user's own good images: the source, the options, a preview, write."""
    st.header("Paint defects onto your own images")
    st.caption("Only good parts so far? The generator's defects are painted onto your defect-free images, matched to "
               "the surface under them, with exact masks (`engine.paint`). Train on the result, or paint during "
               "training with the Train page's paint share; such a run is not ready until tuned on a few real "
               "labelled defects. Where you have a handful of real defects, the Train page's paint share moves those "
               "instead.")
    sources = {name: path for name, path in data.dataset_choices(trainable=True).items()}
    pick = st.selectbox("Good images from", [UPLOAD, FOLDER, *sources], key="paint_from")
    left, mid, right = st.columns(3)
    paint_name = left.text_input("Name of the painted dataset", value="painted", key="paint_name")
    onto = good_images(pick, sources, paint_name)
    paint_count = mid.number_input("Painted set size", min_value=1, max_value=20000, value=200, step=50,
                                   key="paint_count")
    paint_free = right.slider("Left defect-free", 0.0, 0.9, 0.4, 0.05, key="paint_free")
    left, mid, right = st.columns(3)
    paint_types = left.multiselect("Defect types", DEFECT_TYPES, key="paint_types", placeholder="all of them",
                                   help=f"the kinds your line looks for; every kind when none is picked ({EVERY_KIND})")
    paint_size = mid.number_input("Defect size", min_value=0.0, max_value=100000.0, value=0.0, step=0.1,
                                  key="paint_size", help="the side of the square defects are drawn to: a share of "
                                  "each image's short side (0 to 1) or px (above 1); 0: the whole short side")
    paint_most = right.number_input("Defects per image (at most)", min_value=1, max_value=10,
                                    value=DEFECTS_PER_IMAGE, key="paint_most")
    if not onto.strip():
        return
    try:
        params = params_for(",".join(paint_types) or None, size=float(paint_size), count=int(paint_most))
        samples = painted_preview(onto.strip(), seed, params)
    except EngineError as err:
        st.error(str(err))
        return
    for column, (image, mask, types) in zip(st.columns(max(1, len(samples))), samples):
        column.image(for_display(overlay(image, mask, color=(255, 60, 60), alpha=0.0)),
                     caption=", ".join(types) or "no room: left as it is", width="stretch")
    if st.button("Write the painted dataset", key="paint_go"):
        result = run_with_progress("Painting…", lambda report: paintset.paint_dataset(
            onto.strip(), synthset.dataset_dir(paint_name), int(paint_count), float(paint_free), seed,
            params, progress=report))
        if result is not None:
            st.success(f"Dataset **{paint_name}**: {result['images']} images ({result['defective']} with painted "
                       f"defects, {result['defect_free']} left defect-free, {len(result['skipped'])} unreadable "
                       f"skipped) in {result['seconds']:.1f} s.")


def import_section() -> None:
    """Import a folder of the user's own images (images/ + masks/, MVTec-AD, class ids, sorted by verdict)."""
    st.header("Import your own images")
    st.caption("A folder on this machine with images/ and masks/ (optional manifest.csv), one MVTec-AD category "
               "(train/good, test/<type>, ground_truth/<type>), or masks holding class ids 1..K. A folder sorted by "
               "verdict, good/ beside a folder of rejected parts per defect kind, no masks, is kept as it is: it "
               "tunes and reviews a run on the Review page, but cannot train one.")
    with st.form("import"):
        source = st.text_input("Folder to import", placeholder="/path/to/dataset", key="import_src")
        import_name = st.text_input("Name for the imported dataset", value="imported", key="import_name")
        link = st.checkbox("Link the images instead of copying them")
        submitted = st.form_submit_button("Import")
    if submitted:
        imported = run_with_progress("Importing…", lambda report: importer.import_dataset(
            source.strip(), import_name.strip(), link=link, progress=report))
        if imported is not None:
            st.success("\n\n".join(imported.lines()))


def main() -> None:
    """The page: generate a dataset, paint defects onto good images, or import a folder."""
    st.title(":material/science: Generate data")
    st.caption("Procedural metal surfaces (brushed, rolled, ground, cast, polished) with drawn defects and exact "
               "masks. Nothing is written until you press **Generate**.")
    p = parameters()
    preview(p)
    write_dataset(p)
    paint_section(p["seed"])
    import_section()


main()
