"""Export a ClusterFormer model to ONNX, TorchScript or a ``torch.export`` program, for any batch and image size.

``export_model(model, format, out)`` traces the model at the first example size, saves it (to a temporary file
in the output's folder, renamed when complete), reloads the saved file and checks it against PyTorch at every
example size. Formats:

* ``onnx``: ``torch.onnx.export`` with the ``torch.export``-based ("dynamo") exporter by default, input
  ``images (batch, 3, height, width)`` with the three dimensions dynamic, named outputs. The TorchScript-based
  exporter (``onnx_exporter="torchscript"``) is kept as the alternative: it is older and deprecated upstream but
  several times faster to run and needs no ``onnxscript``. Checked with onnxruntime when it is installed.
* ``torchscript``: ``torch.jit.trace``; the trace records the shape arithmetic, so other sizes run as well.
* ``exported-program``: ``torch.export.export`` with ``Dim`` batch, height and width, saved by ``torch.export.save``
  (load with ``torch.export.load(path).module()``).

Classifiers (and backbones) return their logits (features without a head). The dense models return a dict with
the deep-supervision ``aux`` list (and, for panoptic, training-only auxiliary heads); ``FinalOutputs`` exports the
final layer's ``logits``, ``boxes`` and/or ``masks`` as a tuple, in that order, which are also the ONNX output
names. See ``docs/deployment.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..outputs import atomic_path, check_output_file

FORMATS = ("onnx", "torchscript", "exported-program")
ONNX_EXPORTERS = ("dynamo", "torchscript")
DENSE_OUTPUTS = ("logits", "boxes", "masks")  # the final decoder layer's tensors, in this order
DEFAULT_OPSET = 18
# torch.export needs a range for the dynamic sizes; from 64 pixels the deepest stage (stride 32) has at least two
# rows and columns of tokens, which torch.export cannot prove for smaller images (it would specialise on size 1)
MIN_EXPORT_SIZE = 64


class ExportError(ValueError):
    """Bad export input, or an exported file that does not reproduce the model."""


class FinalOutputs(nn.Module):
    """A dense model (``ClusterFormerSets``) that returns its final layer's ``names`` outputs as a tuple."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(images)
        return tuple(outputs[name] for name in self.names)


def exportable(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, list[str]]:
    """The module to trace and its output names: the model itself (one tensor, ``logits``, or ``features`` for
    a model without a classifier) or, for a model that returns a dict, ``FinalOutputs`` over ``DENSE_OUTPUTS``."""
    with torch.no_grad():
        outputs = model(example)
    if isinstance(outputs, torch.Tensor):
        return model, ["logits" if getattr(model, "num_classes", 1) else "features"]
    if isinstance(outputs, dict):
        names = [name for name in DENSE_OUTPUTS if name in outputs]
        if names:
            return FinalOutputs(model, names).eval(), names
    raise ExportError(f"cannot export a model whose output is {type(outputs).__name__} (expected a tensor or a dict "
                      f"with {', '.join(DENSE_OUTPUTS)})")  # fmt: skip


def example_images(sizes: Sequence[tuple[int, int]], batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Normalised-image-like random inputs ``(batch, 3, h, w)``, one per size (batch 2 by default: an example of
    batch 1 would make ``torch.export`` fix the batch size to 1)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, h, w, generator=generator) for h, w in sizes]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' notes that do not apply here: shape arithmetic on Python ints (recorded by the
    tracer; the outputs are checked at other sizes), the deprecation notices of torch.jit and the TorchScript-based
    ONNX exporter, and the ONNX optimiser's log of the constants it does not fold."""
    logger = logging.getLogger("onnxscript")
    level = logger.level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*(torch\.jit|TorchScript-based ONNX)", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*(torch\.jit|TorchScript-based ONNX)", category=DeprecationWarning)
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)


def _dims():
    from torch.export import Dim

    return Dim("batch", min=1), Dim("height", min=MIN_EXPORT_SIZE), Dim("width", min=MIN_EXPORT_SIZE)


def _export_program(module: nn.Module, example: torch.Tensor):
    batch, height, width = _dims()
    return torch.export.export(module, (example,), dynamic_shapes=({0: batch, 2: height, 3: width},), strict=False)


def _save_onnx(module, example, names, path: Path, opset: int, exporter: str) -> None:
    try:
        import onnx  # noqa: F401

        if exporter == "dynamo":
            import onnxscript  # noqa: F401
    except ImportError as error:
        raise ExportError(f"ONNX export needs {error.name}: pip install 'clusterformer[export]'") from None
    if exporter == "dynamo":
        batch, height, width = _dims()
        torch.onnx.export(
            module, (example,), str(path), dynamo=True, input_names=["images"], output_names=names,
            dynamic_shapes=({0: batch, 2: height, 3: width},), opset_version=opset, external_data=False,
            verbose=False,
        )  # fmt: skip
        return
    axes = {"images": {0: "batch", 2: "height", 3: "width"}}
    for name in names:
        axes[name] = {0: "batch", 2: "mask_height", 3: "mask_width"} if name == "masks" else {0: "batch"}
    torch.onnx.export(
        module, (example,), str(path), dynamo=False, input_names=["images"], output_names=names,
        dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
    )  # fmt: skip


def _runner(format: str, path: Path):
    """A function that runs the saved file on an image batch and returns its outputs as a list of tensors, or
    ``None`` when the format's runtime is not installed (onnxruntime)."""
    if format == "onnx":
        try:
            import onnxruntime
        except ImportError:
            return None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: [torch.from_numpy(o) for o in session.run(None, {"images": images.numpy()})]
    loaded = torch.jit.load(str(path), map_location="cpu") if format == "torchscript" else torch.export.load(path)
    module = loaded if format == "torchscript" else loaded.module()

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            outputs = module(images)
        return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)

    return run


def export_model(
    model: nn.Module,
    format: str,
    out: str | Path,
    example_sizes: Sequence[tuple[int, int]] = ((224, 224), (256, 320)),
    opset: int = DEFAULT_OPSET,
    *,
    onnx_exporter: str = "dynamo",
    batch_size: int = 2,
    verify: bool = True,
    atol: float = 1e-3,
    overwrite: bool = False,
) -> dict:
    """Export ``model`` (in eval mode, on the CPU, fp32) to ``out`` in ``format`` (one of :data:`FORMATS`).

    The model is traced at ``example_sizes[0]``; batch, height and width stay dynamic. With ``verify`` the saved
    file is reloaded and run at every example size (``batch_size`` random images) and compared with the model:
    a max abs difference above ``atol`` is an :class:`ExportError` and nothing is written to ``out``. An existing
    ``out`` is an :class:`~clusterformer.outputs.OutputExistsError` unless ``overwrite``; it is replaced only when
    the new file is complete (and verified).

    Returns a report: ``format``, ``path``, ``inputs`` (``["images"]``), ``outputs`` (names, in order),
    ``exporter`` (for ONNX), ``opset`` and ``max_abs_diff`` (``{"HxW": difference}``, empty when not verified;
    ``None`` per size when onnxruntime is not installed).
    """
    if format not in FORMATS:
        raise ExportError(f"unsupported format {format!r}; expected one of {', '.join(FORMATS)}")
    if onnx_exporter not in ONNX_EXPORTERS:
        raise ExportError(f"unknown ONNX exporter {onnx_exporter!r}; expected one of {', '.join(ONNX_EXPORTERS)}")
    check_output_file(out, overwrite)
    sizes = [(int(h), int(w)) for h, w in example_sizes]
    if not sizes:
        raise ExportError("at least one example size is needed")
    uses_torch_export = format == "exported-program" or (format == "onnx" and onnx_exporter == "dynamo")
    if uses_torch_export and min(min(size) for size in sizes) < MIN_EXPORT_SIZE:
        raise ExportError(f"example sizes {sizes}: {format} export needs heights and widths of at least "
                          f"{MIN_EXPORT_SIZE} pixels")  # fmt: skip
    model = model.eval().float().cpu()
    examples = example_images(sizes, batch_size)
    module, names = exportable(model, examples[0])
    out = Path(out)
    report = {"format": format, "path": str(out), "inputs": ["images"], "outputs": names, "max_abs_diff": {}}
    if format == "onnx":
        report.update(exporter=onnx_exporter, opset=opset)
    with atomic_path(out) as tmp, _quiet():
        try:
            with torch.no_grad():
                if format == "onnx":
                    _save_onnx(module, examples[0], names, tmp, opset, onnx_exporter)
                elif format == "torchscript":
                    torch.jit.save(torch.jit.trace(module, examples[0], check_trace=False), str(tmp))
                else:
                    torch.export.save(_export_program(module, examples[0]), tmp)
        except ExportError:
            raise
        except Exception as error:  # the exporters' own errors, one line for the command (chained for the API)
            first = (str(error).strip().splitlines() or [""])[0]
            raise ExportError(
                f"{format} export of {type(model).__name__} failed: {type(error).__name__}: {first}"
            ) from error
        if verify:
            run = _runner(format, tmp)
            for (h, w), images in zip(sizes, examples, strict=True):
                report["max_abs_diff"][f"{h}x{w}"] = None if run is None else _max_abs_diff(module, run, images)
            worst = max((d for d in report["max_abs_diff"].values() if d is not None), default=0.0)
            if worst > atol:
                raise ExportError(f"{out}: the exported {format} model differs from PyTorch by {worst:.3g} "
                                  f"(more than {atol:g}): {report['max_abs_diff']}")  # fmt: skip
    return report


def _max_abs_diff(module: nn.Module, run, images: torch.Tensor) -> float:
    with torch.no_grad():
        expected = module(images)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    got = run(images)
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected, strict=False)):
        shapes = [tuple(g.shape) for g in got], [tuple(e.shape) for e in expected]
        raise ExportError(f"the exported model's output shapes {shapes[0]} differ from PyTorch's {shapes[1]} at "
                          f"input {tuple(images.shape)}")  # fmt: skip
    return max(float((g.float() - e.float()).abs().max()) for g, e in zip(got, expected, strict=True))


# --- the command ------------------------------------------------------------------------------------------------
def _size(text: str) -> tuple[int, int]:
    from ..data.images import image_hw, parse_img_size

    try:
        return image_hw(parse_img_size(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="export a task checkpoint or a timm ClusterFormer to ONNX, TorchScript or a torch.export program",
        description="Export a model with dynamic batch, height and width, and check the saved file against PyTorch "
        "at every --img-size. Either --ckpt (a Lightning checkpoint of any task: dense models export the final "
        "layer's logits, boxes and/or masks) or --weights FILE.safetensors: with --model NAME, a timm-registered "
        "classifier or backbone (--num-classes defaults to the file's head); without --model, a file written by "
        "'clusterformer convert' (its JSON beside it says what to build). See docs/deployment.md.",
    )
    parser.add_argument("--ckpt", help="Lightning checkpoint of a task")
    parser.add_argument("--model", help="timm model name, e.g. clusterformer_tiny (with --weights)")
    parser.add_argument("--num-classes", type=int, help="classes of the --model head (default: the weights')")
    parser.add_argument("--weights", help="safetensors weights (of --model, or from 'clusterformer convert')")
    parser.add_argument("--format", required=True, metavar="{" + ",".join(FORMATS) + "}", help="output format")
    parser.add_argument("--out", required=True, help="output file (.onnx, .pt, .pt2); an existing one is refused")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--img-size",
        type=_size,
        action="append",
        help="N or HxW: the first traces the model, every one checks the saved file (default: 224 and 256x320)",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument(
        "--onnx-exporter",
        default="dynamo",
        metavar="{" + ",".join(ONNX_EXPORTERS) + "}",
        help="torch.export-based (default) or the older TorchScript-based ONNX exporter",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the check of the saved file")
    parser.set_defaults(func=run)
    return parser


def _load_for_export(args: argparse.Namespace) -> nn.Module:
    from ..weights import load_timm_weights, load_weights, task_from_checkpoint

    if bool(args.ckpt) == bool(args.weights):
        raise ExportError("give either --ckpt or --weights")
    if args.ckpt:
        if args.model:
            raise ExportError("--model goes with --weights, not with --ckpt (the checkpoint names its model)")
        return task_from_checkpoint(args.ckpt)[1].model
    if args.model:
        return load_timm_weights(args.model, args.weights, args.num_classes)
    if args.num_classes is not None:
        raise ExportError("--num-classes goes with --model (a file from 'clusterformer convert' names its classes)")
    return load_weights(args.weights)


def run(args: argparse.Namespace) -> int:
    try:
        if args.format not in FORMATS:
            raise ExportError(f"unsupported format {args.format!r}; expected one of {', '.join(FORMATS)}")
        if args.onnx_exporter not in ONNX_EXPORTERS:
            raise ExportError(f"unknown --onnx-exporter {args.onnx_exporter!r}; expected {' or '.join(ONNX_EXPORTERS)}")
        check_output_file(args.out, args.overwrite)  # before the model is loaded
        model = _load_for_export(args)
        report = export_model(
            model, args.format, args.out, args.img_size or ((224, 224), (256, 320)), args.opset,
            onnx_exporter=args.onnx_exporter, verify=not args.no_verify, overwrite=args.overwrite,
        )  # fmt: skip
    except (ValueError, OSError) as error:  # bad input: one line, no traceback
        print(f"clusterformer export: error: {error}", file=sys.stderr)
        return 2
    diffs = ", ".join(f"{size}: {d:.2g}" if d is not None else f"{size}: not run (no onnxruntime)"
                      for size, d in report["max_abs_diff"].items())  # fmt: skip
    print(f"wrote {report['path']} ({args.format}; outputs {', '.join(report['outputs'])})", file=sys.stderr)
    if diffs:
        print(f"max abs difference to PyTorch: {diffs}", file=sys.stderr)
    return 0
