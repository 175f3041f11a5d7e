"""``clusterformer convert --ckpt CKPT --out PREFIX``: a task checkpoint's model as ``PREFIX.safetensors`` and
``PREFIX.json`` (``weights.convert_checkpoint``); with ``--format pretrained``, as a Hugging Face-style folder
``OUT/`` of ``config.json``, ``model.safetensors`` and a model card ``README.md`` (``hub.save_pretrained``). See
``docs/deployment.md``."""

from __future__ import annotations

import argparse
import shlex
import sys

from ..weights import convert_checkpoint

FORMATS = ("safetensors", "pretrained")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="write a task checkpoint's model as safetensors + JSON, or as a Hugging Face-style folder",
        description="Convert a Lightning task checkpoint (loaded with weights_only=True) into PREFIX.safetensors "
        "(the model's state dict, keys without the task's 'model.' prefix) and PREFIX.json (task, model name, "
        "number of classes, the task's hyperparameters). A classifier's file loads with timm.create_model(NAME, "
        "pretrained=True, num_classes=N, pretrained_cfg_overlay=dict(file=..., num_classes=N)); --backbone-only "
        "writes the encoder alone (keys without 'backbone.'), to initialise another task through "
        "backbone_kwargs={pretrained: true, pretrained_cfg_overlay: {file: ...}}. With --format pretrained, --out "
        "is a folder of config.json, model.safetensors and a model card README.md, which "
        "clusterformer.hub.from_pretrained loads (and timm.create_model('local-dir:OUT', pretrained=True) for a "
        "classifier or a dense model's encoder). See docs/deployment.md.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint of a task")
    parser.add_argument(
        "--out", required=True, help="output prefix: writes PREFIX.safetensors and PREFIX.json (the folder, with "
        "--format pretrained)"
    )  # fmt: skip
    parser.add_argument(
        "--format", choices=FORMATS, default="safetensors",
        help="safetensors: the PREFIX.safetensors + PREFIX.json pair (default); pretrained: a Hugging Face-style "
        "folder (config.json, model.safetensors, README.md)",
    )  # fmt: skip
    parser.add_argument("--backbone-only", action="store_true", help="write only the encoder (--format safetensors)")
    parser.add_argument(
        "--metrics-json", metavar="FILE", help="--format pretrained: the metrics of the model card, a JSON object of "
        "names and numbers (such as 'clusterformer evaluate --out' writes); default: the last validation metrics "
        "stored in the checkpoint"
    )  # fmt: skip
    parser.add_argument(
        "--command", dest="made_with", metavar="TEXT", help="--format pretrained: the command that made the model, "
        "for the model card (default: this convert command)"
    )  # fmt: skip
    parser.add_argument(
        "--training-data", metavar="TEXT", help="--format pretrained: the training data, for the model card "
        "(default: what the checkpoint's data settings say)"
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        if args.format == "pretrained":
            folder = _write_folder(args)
            print(f"wrote {folder}", file=sys.stderr)
            return 0
        pretrained_only = [flag for flag, value in _card_options(args) if value is not None]
        if pretrained_only:
            raise ValueError(f"{', '.join(pretrained_only)}: only with --format pretrained (the model card)")
        weights, info = convert_checkpoint(args.ckpt, args.out, args.backbone_only, overwrite=args.overwrite)
    except (ValueError, OSError) as error:  # bad input: one line, no traceback
        print(f"clusterformer convert: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {weights} and {info}", file=sys.stderr)
    return 0


def _card_options(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    return [
        ("--metrics-json", args.metrics_json),
        ("--command", args.made_with),
        ("--training-data", args.training_data),
    ]


def _write_folder(args: argparse.Namespace):
    from ..hub import read_metrics_json, save_pretrained

    if args.backbone_only:
        raise ValueError(
            "--backbone-only: only with --format safetensors (a pretrained folder holds the whole model; "
            "clusterformer.hub.load_backbone or timm.create_model('local-dir:OUT', pretrained=True) load its encoder)"
        )
    metrics = read_metrics_json(args.metrics_json) if args.metrics_json else None
    command = args.made_with or shlex.join(["clusterformer", "convert", "--ckpt", str(args.ckpt), "--out",
                                            str(args.out), "--format", "pretrained"])  # fmt: skip
    return save_pretrained(
        args.ckpt, args.out, metrics=metrics, command=command, training_data=args.training_data,
        overwrite=args.overwrite,
    )  # fmt: skip
