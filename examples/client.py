"""Minimal client of the defect-detection API: send images, print verdicts, optionally save the masks.

    python -m engine serve &                                   # the API on http://127.0.0.1:8000
    python examples/client.py data/procedural_images/images/000001.png --masks out/
    DEFECTS_API_KEY=secret python examples/client.py a.png b.jpg --url http://host:8000 --threshold 0.6

Needs only httpx (pip install httpx).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

import httpx


def predict(client: httpx.Client, image: Path, **params: object) -> dict:
    """POST one image to /predict; returns the JSON answer or raises RuntimeError with the server's detail."""
    with image.open("rb") as handle:
        response = client.post("/predict", files={"file": (image.name, handle)},
                               params={k: v for k, v in params.items() if v is not None})
    if response.status_code != 200:
        try:
            detail = response.json()["detail"]
        except (ValueError, KeyError):
            detail = response.text[:200]
        raise RuntimeError(f"HTTP {response.status_code}: {detail}")
    return response.json()


def main() -> int:
    """Send every image given on the command line and print one line per image."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", default=os.environ.get("DEFECTS_API_KEY"), help="default: $DEFECTS_API_KEY")
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--run", help="run id, 'demo' or 'latest' (default: the server's model)")
    parser.add_argument("--backend", choices=["torch", "onnx", "int8"])
    parser.add_argument("--masks", type=Path, help="save each mask as <DIR>/<image>_mask.png")
    args = parser.parse_args()

    headers = {"X-API-Key": args.key} if args.key else {}
    failed = 0
    with httpx.Client(base_url=args.url, headers=headers, timeout=120) as client:
        for image in args.images:
            try:
                answer = predict(client, image, threshold=args.threshold, run=args.run, backend=args.backend,
                                 return_mask=bool(args.masks))
            except (RuntimeError, OSError, httpx.HTTPError) as err:
                print(f"{image}: error: {err}", file=sys.stderr)
                failed += 1
                continue
            model = answer["model"]
            print(f"{image}: {answer['verdict']}  regions {len(answer['regions'])}  max score "
                  f"{answer['max_score']:.3f}  ({model['run']} epoch {model['epoch']} {model['backend']}, "
                  f"{answer['timings_ms']['total']:.0f} ms)")
            if args.masks:
                args.masks.mkdir(parents=True, exist_ok=True)
                (args.masks / f"{image.stem}_mask.png").write_bytes(base64.b64decode(answer["mask_png_base64"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
