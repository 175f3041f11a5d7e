"""``clusterformer make-shapes --out DIR``: the embedded shapes dataset (``data.shapes.make_shapes``) in ImageFolder,
COCO, ADE20K and COCO panoptic formats."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "make-shapes",
        help="generate the embedded shapes dataset in ImageFolder, COCO, ADE20K and COCO panoptic formats",
        description="Generate scenes of geometric 'thing' shapes (circle, square, triangle, star) over 'stuff' "
        "regions (sky, ground, water), deterministically from --seed, and write them as ImageFolder crops, COCO "
        "instances JSON, ADE20K-style semantic PNGs and COCO panoptic JSON + PNGs, with OUT/shapes.json (the "
        "options and the files). Rerun into the same folder with the same options, it writes the same files again; "
        "a folder holding a dataset of other options is refused unless --overwrite.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset of other options in --out (its files are deleted first); without it, such a "
        "folder is refused, and the same options write the same files again",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..data import make_shapes

    try:
        written = make_shapes(args.out, args.seed, args.num_train, args.num_val, args.size, overwrite=args.overwrite)
    except (ValueError, OSError) as error:  # bad options or an output folder holding another dataset
        print(f"clusterformer make-shapes: error: {error}", file=sys.stderr)
        return 2
    for split, counts in written.items():
        print(f"{split}: {counts['images']} images, {counts['instances']} instances, {counts['crops']} crops")
    print(f"wrote {args.out}")
    return 0
