"""``clusterformer serve --ckpt CKPT``: a local web page (Gradio) that runs a task checkpoint on an uploaded or
example image and shows, side by side, the prediction (:meth:`Result.draw <clusterformer.results.Result.draw>`, what
``clusterformer predict`` draws) and the cluster map of an encoder stage (and, for dense models, of the decoder), drawn
as ``clusterformer explain`` draws them (the paper's Figure 3), with a slider for the stage and one for the head, or
every head of the stage at once.

The model runs once per image (:class:`~clusterformer.Predictor` for the prediction, ``explain``'s
:func:`~clusterformer.commands.explain.compute_assignments` for the maps); the hard assignments are kept in the page's
state, so moving a slider only redraws. Examples: scikit-image's sample photographs (shipped inside scikit-image) and
shapes scenes generated in memory (:func:`~clusterformer.data.shapes.render_scene`); nothing is downloaded.

Gradio is an optional dependency (``pip install 'clusterformer[serve]'``), imported when the page is built.
:func:`build_app` returns the ``gr.Blocks`` page; :class:`WebDemo` holds what its callbacks compute, for tests and
other front ends. See ``docs/predict_explain.md``, "Web demo".
"""

from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .. import pictures
from ..predictor import ImageInput, Predictor, as_image
from ..results import Classification, Detections, PanopticMap, Result, SemanticMap
from .explain import ExplainModel, compute_assignments, draw_clusters, model_from_predictor
from .predict import read_class_names

MAX_SIDE = 1024  # pictures on the page: a larger image is drawn scaled down to this longer side
MONTAGE_SIDE = 256  # "all heads": the smallest longer side of a head's picture
EXAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea")  # skimage.data's
EXAMPLE_SCENES = (0, 1, 2)  # seeds of the shapes scenes
SCENE_SIZE = 128  # pixels, make-shapes' default
INSTALL_HINT = "pip install 'clusterformer[serve]' (or pip install 'gradio>=4.44')"


class ServeError(ValueError):
    """Bad input to ``serve`` (or Gradio missing): the message names the problem."""


def import_gradio():
    """The ``gradio`` module, or a :class:`ServeError` that says how to install it."""
    try:
        import gradio
    except ImportError:
        raise ServeError(f"the web demo needs Gradio, which is not installed: {INSTALL_HINT}") from None
    return gradio


def example_images() -> dict[str, np.ndarray]:
    """The page's examples, name -> ``(H, W, 3)`` uint8: scikit-image's sample photographs when scikit-image is
    installed (the ``serve`` extra installs it), then shapes scenes rendered from fixed seeds."""
    from ..data.shapes import render_scene

    examples = {}
    try:
        from skimage import data as photographs
    except ImportError:
        photographs = None
    for name in EXAMPLE_PHOTOS if photographs is not None else ():
        examples[name] = np.ascontiguousarray(getattr(photographs, name)())
    for seed in EXAMPLE_SCENES:
        examples[f"shapes {seed}"] = render_scene(np.random.default_rng(seed), SCENE_SIZE).image
    return examples


def display_image(image: Image.Image) -> Image.Image:
    """The image at the size the page draws it: enlarged by an integer factor when its longer side is under 512
    pixels (``pictures.display_factor``, as :meth:`Result.draw` enlarges it), scaled down to :data:`MAX_SIDE` when
    it is longer, else as it is."""
    if max(image.size) > MAX_SIDE:
        scale = MAX_SIDE / max(image.size)
        return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    factor = pictures.display_factor(image.height, image.width)
    return Image.fromarray(pictures.enlarge(np.asarray(image), factor))


def label_summary(result: Result) -> dict[str, float]:
    """What the page lists beside the prediction (``gr.Label``: name -> value in [0, 1], largest first):
    classification its top ``k`` classes and their probabilities; detection and instance segmentation per class the
    best score and the number of objects; semantic and panoptic segmentation per class the fraction of the image's
    pixels (and the number of segments of a thing class)."""
    if isinstance(result, Classification):
        return {name: float(score) for name, score in zip(result.names, result.scores, strict=True)}
    best: dict[str, tuple[float, int]] = {}
    if isinstance(result, Detections):
        for name, score in zip(result.names, result.scores, strict=True):
            top, count = best.get(name, (0.0, 0))
            best[name] = (max(top, float(score)), count + 1)
        return {f"{name} ({count})": top for name, (top, count) in best.items()}
    pixels = result.segmentation.size
    if isinstance(result, SemanticMap):
        counts = np.bincount(result.segmentation.ravel())
        return {name: float(counts[label] / pixels) for label, name in zip(result.labels, result.names, strict=True)}
    if isinstance(result, PanopticMap):
        for segment in result.segments_info:
            area, count = best.get(segment["name"], (0.0, 0))
            best[segment["name"]] = (area + segment["area"] / pixels, count + bool(segment["isthing"]))
        return {(f"{name} ({count})" if count else name): area for name, (area, count) in best.items()}
    return {}


@dataclass
class ClusterMaps:
    """The hard cluster assignments of one image, what the sliders redraw: ``picture``, the image at its display
    size (:func:`display_image`); ``input_size``, the model input's ``(h, w)``; ``maps``, per encoder stage (then the
    decoder) ``name``, ``stride``, ``clusters`` (K) and ``labels`` ``(heads, h, w)``, the argmax over K."""

    picture: np.ndarray
    input_size: tuple[int, int]
    maps: list[dict] = field(default_factory=list)


class WebDemo:
    """The page's computations for the checkpoint's model (an :class:`~clusterformer.commands.explain.ExplainModel`
    that holds its :class:`~clusterformer.Predictor`): :meth:`predict` (an image -> the prediction, its summary and a
    cluster map) and :meth:`redraw` (another stage or head of the same image), plain Python, callable without
    Gradio."""

    def __init__(self, model: ExplainModel, alpha: float = 0.5):
        if model.predictor is None:
            raise ServeError(f"{model.description}: the web demo needs a task checkpoint (Predictor.from_checkpoint)")
        self.model, self.predictor, self.alpha = model, model.predictor, alpha
        # the maps and their heads, from a small image: also runs the model once before the page is served
        probe = compute_assignments(model, Image.new("RGB", (64, 64), (128, 128, 128)), 64, self.predictor.device)
        self.map_names = [entry["name"] for entry in probe["maps"]]
        self.map_heads = [entry["assignments"].shape[0] for entry in probe["maps"]]

    @classmethod
    def from_checkpoint(cls, path: str | Path, **options) -> WebDemo:
        """The demo of the task checkpoint at ``path``; ``options``: :meth:`Predictor.from_checkpoint`'s."""
        return cls(model_from_predictor(Predictor.from_checkpoint(path, **options), f"checkpoint {path}"))

    @property
    def task(self) -> str:
        return self.predictor.task

    @property
    def num_maps(self) -> int:
        """The encoder's stages, and the decoder's map for a dense model: the stage slider's range ``1..num_maps``."""
        return len(self.map_names)

    @property
    def max_heads(self) -> int:
        """The most heads of any map: the head slider's range ``0..max_heads - 1``."""
        return max(self.map_heads)

    def analyse(self, image: ImageInput) -> tuple[Result, ClusterMaps]:
        """The prediction of ``image`` (a path, PIL image or uint8 array) and its hard cluster assignments."""
        image = as_image(image)
        result = self.predictor(image)
        computed = compute_assignments(self.model, image, None, self.predictor.device)
        maps = [{"name": entry["name"], "stride": entry["stride"], "clusters": entry["assignments"].shape[1],
                 "labels": entry["assignments"].argmax(1).astype(np.int16)}
                for entry in computed["maps"]]  # fmt: skip
        return result, ClusterMaps(np.asarray(display_image(image)), tuple(computed["input_size"]), maps)

    def redraw(self, maps: ClusterMaps | None, stage: int, head: int, all_heads: bool) -> tuple[np.ndarray | None, str]:
        """The cluster picture of map ``stage`` (1-based: the encoder's stages, then the decoder's map) for ``head``
        (0-based; a map with fewer heads shows its last), or of every head of the map side by side (``all_heads``),
        and its caption."""
        if maps is None:
            return None, ""
        entry = maps.maps[min(max(int(stage), 1), len(maps.maps)) - 1]
        labels, k, stride = entry["labels"], entry["clusters"], entry["stride"]
        heads = labels.shape[0]
        grid = f"{labels.shape[1]}x{labels.shape[2]} tokens of {stride}x{stride} pixels"

        def draw(h: int) -> np.ndarray:
            return draw_clusters(maps.picture, labels[h], k, stride, maps.input_size, self.alpha)

        if all_heads and heads > 1:
            used = ", ".join(str(len(np.unique(labels[h]))) for h in range(heads))
            caption = (f"**{entry['name']}**: {grid}; all {heads} heads, left to right and top to bottom; "
                       f"clusters used (of {k}) per head: {used}")  # fmt: skip
            return montage([draw(h) for h in range(heads)]), caption
        shown = min(max(int(head), 0), heads - 1)
        note = f" (this map has {heads} head{'s' * (heads > 1)})" if shown != int(head) else ""
        used = len(np.unique(labels[shown]))
        caption = f"**{entry['name']}**: {grid}; head {shown}{note}: {used} of {k} clusters used"
        return draw(shown), caption

    def predict(self, image, stage: int = 1, head: int = 0, all_heads: bool = False):
        """The page's callback for a new image: ``(prediction, summary, cluster picture, caption, maps)``, the
        prediction drawn (:meth:`Result.draw`) as a PIL image, its :func:`label_summary`, :meth:`redraw` of the
        stage and head asked for, and the :class:`ClusterMaps` kept for the sliders. No image (the input cleared):
        nothing to show."""
        if image is None:
            return None, None, None, "", None
        result, maps = self.analyse(image)
        picture, caption = self.redraw(maps, stage, head, all_heads)
        return result.draw(max_side=MAX_SIDE), label_summary(result), picture, caption, maps


def montage(panels: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Pictures of one size side by side in rows of ``ceil(sqrt(n))`` on white, each scaled down to fit
    :data:`MAX_SIDE` over the row, or to :data:`MONTAGE_SIDE` when that is larger."""
    columns = int(np.ceil(np.sqrt(len(panels))))
    rows = -(-len(panels) // columns)
    side = max(MONTAGE_SIDE, MAX_SIDE // columns)
    small = []
    for panel in panels:
        picture = Image.fromarray(panel)
        picture.thumbnail((side, side), Image.BILINEAR)
        small.append(np.asarray(picture))
    height, width = small[0].shape[:2]
    sheet = np.full((rows * height + (rows - 1) * gap, columns * width + (columns - 1) * gap, 3), 255, np.uint8)
    for i, picture in enumerate(small):
        y, x = (i // columns) * (height + gap), (i % columns) * (width + gap)
        sheet[y : y + height, x : x + width] = picture
    return sheet


def _without_buttons(gr) -> dict:
    """``gr.Image`` options that leave out the buttons it draws over the picture's top-right corner, where the
    semantic and panoptic legends are (``buttons`` since Gradio 6, ``show_*_button`` before)."""
    parameters = inspect.signature(gr.Image.__init__).parameters
    if "buttons" in parameters:
        return {"buttons": []}
    names = ("show_download_button", "show_share_button", "show_fullscreen_button")
    return {name: False for name in names if name in parameters}


def build_app(predictor_or_ckpt: WebDemo | Predictor | str | Path, title: str | None = None):
    """The web page (a ``gr.Blocks``) for a task checkpoint's path, a :class:`~clusterformer.Predictor` or a
    :class:`WebDemo`. ``app.launch(server_name=..., server_port=...)`` serves it; tests launch it with
    ``prevent_thread_lock=True`` and ``app.close()`` it. Elements the tests find: ``#input-image``, ``#examples``,
    ``#prediction``, ``#summary``, ``#cluster-map``, ``#map-caption``, ``#stage``, ``#head``, ``#all-heads``."""
    gr = import_gradio()
    if isinstance(predictor_or_ckpt, WebDemo):
        demo = predictor_or_ckpt
    elif isinstance(predictor_or_ckpt, Predictor):
        demo = WebDemo(model_from_predictor(predictor_or_ckpt, "model"))
    else:
        demo = WebDemo.from_checkpoint(predictor_or_ckpt)
    description = demo.model.description
    stages = demo.num_maps - (1 if demo.model.dense is not None else 0)
    decoder = f"; {demo.num_maps}: the decoder's assignment of pixels to queries" if stages < demo.num_maps else ""

    with gr.Blocks(title=title or "ClusterFormer", analytics_enabled=False) as app:
        gr.Markdown(
            f"## ClusterFormer: {demo.task}\n{description}. Upload an image or pick an example: the prediction and the "
            "cluster assignment of an encoder stage (the argmax over the clusters of its last block's last E-step, "
            "one colour per cluster, white lines between clusters; the paper's Figure 3)."
        )
        maps_state = gr.State(None)
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="image", format="png", elem_id="input-image")
                examples = example_images()
                gr.Examples([[picture] for picture in examples.values()], inputs=[image], label="examples",
                            elem_id="examples")  # fmt: skip
            with gr.Column():
                # the images' labels would cover the top-left corner, where classification writes its classes
                gr.Markdown("**prediction**")
                prediction = gr.Image(label="prediction", show_label=False, format="png", interactive=False,
                                      elem_id="prediction", **_without_buttons(gr))  # fmt: skip
                summary = gr.Label(label="classes", elem_id="summary")
            with gr.Column():
                gr.Markdown("**cluster map**")
                cluster_map = gr.Image(label="cluster map", show_label=False, format="png", interactive=False,
                                       elem_id="cluster-map", **_without_buttons(gr))  # fmt: skip
                caption = gr.Markdown(elem_id="map-caption")
                stage = gr.Slider(1, demo.num_maps, value=1, step=1, label="stage",
                                  info=f"encoder stages 1-{stages}{decoder}", elem_id="stage")  # fmt: skip
                heads = ", ".join(map(str, demo.map_heads))
                head = gr.Slider(0, max(demo.max_heads - 1, 1), value=0, step=1, label="head",
                                 info=f"heads per map: {heads}", elem_id="head")  # fmt: skip
                all_heads = gr.Checkbox(False, label="all heads of the stage", elem_id="all-heads")
        options = [stage, head, all_heads]
        # one image at a time: explain's decoder map reads the model through forward hooks
        image.change(demo.predict, [image, *options], [prediction, summary, cluster_map, caption, maps_state],
                     concurrency_limit=1)  # fmt: skip
        for control in options:
            control.change(demo.redraw, [maps_state, *options], [cluster_map, caption])
    return app


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="a local web page: upload an image, see the prediction and the cluster maps of every stage (Gradio)",
        description="Serve a local web page (Gradio) for a task checkpoint of any task: upload an image or pick an "
        "example (scikit-image's photographs, generated shapes scenes) and see the prediction beside the cluster "
        "map of an encoder stage (as 'clusterformer explain' draws it), with sliders for the stage and the head. "
        f"Needs Gradio: {INSTALL_HINT}.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint of any ClusterFormer task")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    parser.add_argument("--class-names", help="text file, one class name per line in label order (as for predict)")
    parser.add_argument(
        "--score-threshold",
        type=float,
        help="detection / instance: the objects kept (default 0.5); panoptic: the mask-wise merging's threshold",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        if not Path(args.ckpt).is_file():
            raise ServeError(f"{args.ckpt}: checkpoint file not found")
        class_names = read_class_names(args.class_names) if args.class_names else None
        import_gradio()  # before the model is loaded
        demo = WebDemo.from_checkpoint(args.ckpt, device=args.device, score_threshold=args.score_threshold,
                                       class_names=class_names)  # fmt: skip
        app = build_app(demo)
        try:
            _, url, _ = app.launch(server_name=args.host, server_port=args.port, share=False, show_error=True,
                                   quiet=True, prevent_thread_lock=True)  # fmt: skip
        except OSError as error:  # Gradio's message names its own parameters
            reason = str(error).split(". ")[0]
            raise ServeError(f"--host {args.host} --port {args.port}: cannot serve there ({reason}); choose another "
                             "--port") from None  # fmt: skip
        print(f"clusterformer serve: {demo.model.description} on {url} (Ctrl-C stops)")
        app.block_thread()  # until Ctrl-C
    except (ValueError, OSError) as error:  # bad input, a port in use: one line, no traceback
        print(f"clusterformer serve: error: {error}", file=sys.stderr)
        return 2
    return 0
