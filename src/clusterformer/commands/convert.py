"""``clusterformer convert --ckpt CKPT --out PREFIX``: a task checkpoint's model as ``PREFIX.safetensors`` and
``PREFIX.json`` (``weights.convert_checkpoint``; see ``docs/deployment.md``)."""

from __future__ import annotations

import argparse
import sys

from ..weights import convert_checkpoint


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="write a task checkpoint's model as safetensors + JSON (safe to share; loads with timm)",
        description="Convert a Lightning task checkpoint (loaded with weights_only=True) into PREFIX.safetensors "
        "(the model's state dict, keys without the task's 'model.' prefix) and PREFIX.json (task, model name, "
        "number of classes, the task's hyperparameters). A classifier's file loads with timm.create_model(NAME, "
        "pretrained=True, num_classes=N, pretrained_cfg_overlay=dict(file=..., num_classes=N)); --backbone-only "
        "writes the encoder alone (keys without 'backbone.'), to initialise another task through "
        "backbone_kwargs={pretrained: true, pretrained_cfg_overlay: {file: ...}}. See docs/deployment.md.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint of a task")
    parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.safetensors and PREFIX.json")
    parser.add_argument("--backbone-only", action="store_true", help="write only the encoder")
    parser.add_argument("--overwrite", action="store_true", help="replace existing PREFIX.safetensors / PREFIX.json")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        weights, info = convert_checkpoint(args.ckpt, args.out, args.backbone_only, overwrite=args.overwrite)
    except (ValueError, OSError) as error:  # bad input: one line, no traceback
        print(f"clusterformer convert: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {weights} and {info}", file=sys.stderr)
    return 0
