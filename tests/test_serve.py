"""``clusterformer serve``: the web demo's callbacks for every task (the prediction, and every stage and head of the
cluster maps drawn as ``explain`` draws them), the command's errors before any server starts, and the page in a real
headless browser (Debian's Chromium and its driver: skipped when they are missing, a failure when
``CLUSTERFORMER_REQUIRE_BROWSER`` is set, as .ci/run does once it has installed them, so that CI always runs it).

``pytest tests/test_serve.py --web-demo-ckpt CKPT [--web-demo-class-names TXT] --web-demo-screenshot PNG`` runs the
browser test on another checkpoint and keeps its screenshot (docs/images/web_demo.png was made so:
docs/predict_explain.md, "Web demo")."""

import base64
import importlib
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clusterformer.cli import main
from clusterformer.commands import serve
from clusterformer.commands.explain import explain_image
from clusterformer.commands.predict import read_class_names
from clusterformer.commands.serve import WebDemo, example_images, label_summary
from helpers import SIZE, train_one_step

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # conftest.py
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),  # Gradio's own use of pandas
]

TASKS = ("classification", "detection", "instance", "semantic", "panoptic")
# set by .ci/run once it has installed Chromium: then a missing browser or module is a failure, not a skip
REQUIRE = "CLUSTERFORMER_REQUIRE_BROWSER"
BROWSER_TIMEOUT = 240  # seconds for the page's first prediction on a busy 2-core CPU


def needed(module: str):
    """``module`` imported; missing, the test is skipped, or fails when ``CLUSTERFORMER_REQUIRE_BROWSER`` is set."""
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{module} is not installed (pip install -e '.[test]')"
        if os.environ.get(REQUIRE):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir(seed=4, num_train=8, num_val=5, size=SIZE)


@pytest.fixture(scope="module")
def checkpoint(shapes, tmp_path_factory):
    """``checkpoint(task)``: a checkpoint of ``task`` after one training step, made on first use."""
    folder = tmp_path_factory.mktemp("checkpoints")
    made = {}

    def make(task: str) -> Path:
        if task not in made:
            made[task] = train_one_step(task, shapes, folder / f"{task}.ckpt")
        return made[task]

    return make


@pytest.mark.parametrize("task", TASKS)
def test_the_callback_draws_the_prediction_and_every_stage_and_head(task, checkpoint):
    demo = WebDemo.from_checkpoint(checkpoint(task), score_threshold=0.0)  # the one-step models' objects kept
    dense = task != "classification"
    assert demo.num_maps == 4 + dense and demo.map_names[:4] == ["stage 1", "stage 2", "stage 3", "stage 4"]
    assert demo.map_names[-1].startswith("decoder") == dense
    scene = example_images()["shapes 0"]  # 128 x 128, drawn at 512 x 512
    prediction, summary, picture, caption, maps = demo.predict(scene, 1, 0, False)
    assert isinstance(prediction, Image.Image) and prediction.size[0] >= 512
    assert picture.shape == (512, 512, 3) and picture.dtype == np.uint8 and "**stage 1**" in caption
    assert summary and all(0 <= value <= 1 for value in summary.values())
    if task == "classification":  # the top 5 of the 4 classes, best first
        assert list(summary) == demo.predictor(scene).names and set(summary) == set(demo.predictor.classes)
    pictures = set()
    for stage in range(1, demo.num_maps + 1):
        heads = demo.map_heads[stage - 1]
        for head in range(demo.max_heads):
            picture, caption = demo.redraw(maps, stage, head, False)
            assert picture.shape == (512, 512, 3), (stage, head)
            assert f"**{demo.map_names[stage - 1]}**" in caption and f"head {min(head, heads - 1)}" in caption
            assert ("this map has" in caption) == (head >= heads)
            pictures.add(picture.tobytes())
        sheet, caption = demo.redraw(maps, stage, 0, True)
        if heads > 1:  # every head side by side
            assert sheet.shape[1] > 512 and f"all {heads} heads" in caption
        else:
            assert sheet.shape == (512, 512, 3)
    assert len(pictures) > demo.num_maps  # stages and heads differ
    assert demo.predict(None) == (None, None, None, "", None)  # the image cleared
    assert demo.redraw(None, 1, 0, False) == (None, "")


def test_the_maps_are_explains_pictures(checkpoint, tmp_path):
    """At the image's own size (a 512-pixel photograph is drawn as it is) every map is the picture that
    ``clusterformer explain`` writes, the decoder's included."""
    photographs = needed("skimage.data")
    photo = tmp_path / "astronaut.png"
    Image.fromarray(photographs.astronaut()).save(photo)
    demo = WebDemo.from_checkpoint(checkpoint("panoptic"))
    *_, maps = demo.predict(Image.open(photo), 1, 0, False)
    report = explain_image(demo.model, photo, tmp_path / "explain", head=0, all_heads=True)
    for stage, record in enumerate(report["maps"], start=1):
        name = record["file"].removesuffix(".png")
        for head in range(record["heads"]):
            picture, _ = demo.redraw(maps, stage, head, False)
            assert np.array_equal(picture, np.asarray(Image.open(tmp_path / "explain" / f"{name}_head{head}.png")))


def test_the_summary_lists_what_each_task_found(checkpoint):
    scene = example_images()["shapes 1"]
    for task in ("semantic", "panoptic"):
        result = WebDemo.from_checkpoint(checkpoint(task), score_threshold=0.0).predictor(scene)
        fractions = label_summary(result)
        void = (result.segmentation == 0).mean() if task == "panoptic" else 0
        assert sum(fractions.values()) == pytest.approx(1 - void)  # fractions of the image's pixels
    detections = WebDemo.from_checkpoint(checkpoint("detection"), score_threshold=0.0).predictor(scene)
    summary = label_summary(detections)
    assert sum(int(key.rpartition("(")[2].rstrip(")")) for key in summary) == len(detections)  # name (count)
    for key, best in summary.items():
        name = key.rpartition(" (")[0]
        scores = [s for n, s in zip(detections.names, detections.scores, strict=True) if n == name]
        assert best == pytest.approx(max(scores))


def test_the_examples_need_no_download():
    examples = example_images()
    assert [name for name in examples if name.startswith("shapes")] == ["shapes 0", "shapes 1", "shapes 2"]
    for picture in examples.values():
        assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert np.array_equal(example_images()["shapes 2"], examples["shapes 2"])  # the same scenes every time


def test_a_bad_checkpoint_is_one_line_before_any_server_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(serve, "build_app", lambda *a, **k: pytest.fail("the page was built"))
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    for path in (broken, tmp_path / "missing.ckpt"):
        assert main(["serve", "--ckpt", str(path)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("clusterformer serve: error: ") and str(path) in line
    names = tmp_path / "names.txt"
    assert main(["serve", "--ckpt", str(broken), "--class-names", str(names)]) == 2  # a missing names file
    assert f"clusterformer serve: error: {names}: cannot read the class names" in capsys.readouterr().err


def test_without_gradio_the_error_names_the_extra(checkpoint, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    assert main(["serve", "--ckpt", str(checkpoint("classification"))]) == 2
    error = capsys.readouterr().err
    assert "needs Gradio" in error and "pip install 'clusterformer[serve]'" in error
    with pytest.raises(serve.ServeError, match=r"clusterformer\[serve\]"):
        serve.build_app(checkpoint("classification"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served(request, checkpoint):
    """The page of ``--web-demo-ckpt`` (default a one-step panoptic checkpoint, whose maps include the decoder's),
    launched on a free port; yields its URL and closes it."""
    needed("gradio")
    from clusterformer import Predictor

    ckpt = request.config.getoption("--web-demo-ckpt") or checkpoint("panoptic")
    names = request.config.getoption("--web-demo-class-names")
    app = serve.build_app(Predictor.from_checkpoint(ckpt, class_names=names and read_class_names(names)))
    _, url, _ = app.launch(
        server_name="127.0.0.1", server_port=free_port(), share=False, prevent_thread_lock=True, quiet=True
    )
    yield url
    app.close()


def test_a_port_in_use_is_one_line(checkpoint, capsys):
    needed("gradio")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--ckpt", str(checkpoint("classification")), "--port", str(port)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"clusterformer serve: error: --host 127.0.0.1 --port {port}: cannot serve there")


def chromium() -> tuple[str, str]:
    """The paths of Chromium and its driver (Debian's ``chromium`` and ``chromium-driver``)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        message = "Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get(REQUIRE):
            pytest.fail(message + "; .ci/run installs them")
        pytest.skip(message)
    return browser, driver


def test_a_missing_browser_skips_locally_and_fails_where_required(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv(REQUIRE, raising=False)
    with pytest.raises(pytest.skip.Exception):
        chromium()
    monkeypatch.setenv(REQUIRE, "1")
    with pytest.raises(pytest.fail.Exception, match="chromium-driver"):
        chromium()


def test_the_page_predicts_an_uploaded_image_and_an_example_in_a_headless_browser(served, request, tmp_path):
    browser, driver_path = chromium()
    webdriver = needed("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    scene = tmp_path / "scene.png"
    Image.fromarray(example_images()["shapes 0"]).save(scene)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    images = "return [...document.querySelectorAll(arguments[0] + ' img')].map(i => [i.src, i.naturalWidth])"
    try:
        driver.get(served)
        upload = WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.CSS_SELECTOR, "#input-image input[type=file]")
        )
        count = len(example_images())
        WebDriverWait(driver, 60).until(  # the thumbnails, loaded
            lambda d: sum(width > 0 for _, width in d.execute_script(images, "#examples")) == count
        )
        upload.send_keys(str(scene))
        started = time.monotonic()
        sources = {}
        for element in ("#prediction", "#cluster-map"):  # the result images, loaded
            shown = WebDriverWait(driver, BROWSER_TIMEOUT).until(
                lambda d, element=element: [(src, w) for src, w in d.execute_script(images, element) if w > 0]
            )
            (sources[element], width), *_ = shown
            assert sources[element].startswith("http") and width >= 512
        WebDriverWait(driver, 30).until(lambda d: "stage 1" in d.find_element(By.ID, "map-caption").text)
        assert driver.find_element(By.ID, "summary").text.strip()
        print(f"first prediction shown after {time.monotonic() - started:.1f} s")
        # the whole page, as tall as its content
        size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        screenshot = driver.execute_cdp_cmd("Page.captureScreenshot",
                                            {"format": "png", "captureBeyondViewport": True, "clip": clip})  # fmt: skip
        shot = tmp_path / "web_demo.png"
        shot.write_bytes(base64.b64decode(screenshot["data"]))
        # an example, clicked, is predicted in turn
        driver.find_elements(By.CSS_SELECTOR, "#examples img")[0].click()
        WebDriverWait(driver, BROWSER_TIMEOUT).until(
            lambda d: any(w > 0 and src != sources["#prediction"] for src, w in d.execute_script(images, "#prediction"))
        )
    finally:
        driver.quit()
    with Image.open(shot) as picture:
        assert picture.width >= 1000 and len(np.unique(np.asarray(picture.convert("RGB")).reshape(-1, 3), axis=0)) > 100
    keep = request.config.getoption("--web-demo-screenshot")
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep)
