"""How much JPEG compression costs BP on CIFAR-10: the conv bench's BP recipe on copies of lower quality.

    python benchmarks/jpeg_quality.py --data-dir ../shared/data --threads 1        # 4 runs, ~70 CPU-minutes

Our CIFAR-10 is a JPEG quality-75 copy, so the cost of that compression against the lossless images cannot be
measured here. This measures its dose-response instead: every image of our copy (training and test) is encoded
again at a lower quality and decoded, and the conv bench's BP run (small CNN, crop-and-flip, 20 epochs, Adam lr
1e-3, batch 128, cosine; ``torchsal bench --protocol conv``) trains on each copy, same seed, same split. If
halving the quality moves accuracy by a fraction of a point, the first compression is unlikely to explain a gap of
several points. Runs are logged as they finish (``OUT/jpeg-quality.jsonl``); a rerun resumes; ``jpeg-quality.md``
is written beside the log, with each copy's size and its PSNR against our copy.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from study import RunLog, mean_std, study_parser

SHIPPED = 75            # the quality of the copy in ../shared/data


def recompress(x: np.ndarray, shape: tuple[int, int, int], quality: int) -> tuple[np.ndarray, float]:
    """Every flat channels-last image of ``x`` encoded as JPEG at ``quality`` and decoded; and the mean bytes."""
    from PIL import Image

    channels, height, width = shape
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, height, width, channels)
    out, size = np.empty_like(images), 0
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if channels == 1 else image).save(buffer, "JPEG", quality=quality)
        size += buffer.tell()
        out[i] = np.asarray(Image.open(buffer)).reshape(height, width, channels)
    return out.reshape(len(x), -1).astype(x.dtype), size / len(x)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b) ** 2)))


def run(args) -> list[dict]:  # noqa: ANN001
    from torchsal import load_dataset, make_splits, train
    from torchsal.bench import PROTOCOLS, preset_config

    recipe = PROTOCOLS["conv"]
    own = dict(recipe.datasets["cifar10"])
    recipe_epochs = own.pop("epochs")
    epochs = args.epochs or recipe_epochs
    log = RunLog(Path(args.out) / "jpeg-quality.jsonl", key=lambda r: (r["quality"], r["seed"], r["epochs"]))
    shipped = load_dataset("cifar10", args.data_dir, recipe.base.get("grayscale", False))
    for quality in map(int, args.qualities.split(",")):
        seeds = [s for s in map(int, args.seeds.split(",")) if not log.done((quality, s, epochs))]
        if not seeds:
            continue
        data, size, fidelity = shipped, None, None
        if quality != SHIPPED:
            x, size = recompress(shipped.x, shipped.image_shape, quality)
            x_test, _ = recompress(shipped.x_test, shipped.image_shape, quality)
            fidelity = psnr(shipped.x_test, x_test)
            data = dataclasses.replace(shipped, x=x, x_test=x_test)
        for seed in seeds:
            config = preset_config("bp", **{**recipe.base, **own}, dataset="cifar10", lr=args.lr, epochs=epochs,
                                   seed=seed, threads=args.threads)
            m = train(config, splits=make_splits(data, seed), progress=False).metrics
            log.add({"quality": quality, "seed": seed, "epochs": epochs, "lr": args.lr,
                     "bytes_per_image": size, "psnr_vs_shipped_db": fidelity,
                     "test_accuracy": m["test_accuracy"], "val_accuracy": m["val_accuracy"],
                     "seconds": m["train_seconds"]})
    return log.rows


def markdown(rows: list[dict]) -> str:
    lines = [f"| JPEG quality (BP, small CNN, CIFAR-10, {rows[0]['epochs']} epochs) | mean bytes per image | "
             "PSNR against our copy, dB | test % | validation % | seeds |", "|---|---|---|---|---|---|"]
    for quality in sorted({r["quality"] for r in rows}, reverse=True):
        cell = [r for r in rows if r["quality"] == quality]
        size, fidelity = cell[0]["bytes_per_image"], cell[0]["psnr_vs_shipped_db"]
        lines.append(f"| {quality}{' (our copy)' if quality == SHIPPED else ''} | "
                     f"{'–' if size is None else f'{size:.0f}'} | "
                     f"{'–' if fidelity is None else f'{fidelity:.1f}'} | "
                     f"{mean_std([100 * r['test_accuracy'] for r in cell], 2)} | "
                     f"{mean_std([100 * r['val_accuracy'] for r in cell], 2)} | {len(cell)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = study_parser(__doc__, rules="bp", epochs=0, epochs_help="epochs (default: the conv recipe's, 20)")
    parser.add_argument("--qualities", default="75,50,25,10",
                        help=f"JPEG qualities; {SHIPPED} is our copy as it is, lower ones are encoded again")
    parser.add_argument("--lr", type=float, default=1e-3, help="BP's rate in the conv bench (chosen on validation)")
    parser.set_defaults(out="docs/conv/jpeg-quality", seeds="0")
    args = parser.parse_args()
    rows = run(args)
    if rows:
        (Path(args.out) / "jpeg-quality.md").write_text(markdown(rows))
        print(markdown(rows))


if __name__ == "__main__":
    main()
