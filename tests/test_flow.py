"""The gradient-flow picture: read back from the TensorBoard event file and the PNG a real Trainer wrote."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch import nn

from conftest import events, fit
from lightning_gradguard import GradGuard
from lightning_gradguard.dashboard import REPORT_FILE, Dashboard
from lightning_gradguard.flow import FLOW_FILE, FLOW_TAG, SCALES, WIDTH, FlowHistory, _load_font, _shorten, render_flow


class Planted(LightningModule):
    """``enc`` → ``head``, plus a ``side`` branch scaled by 1e-8 (its gradients vanish) and a ``boom`` branch on the
    input scaled by 3 (its gradients are the largest, and it has no parameters upstream to share them with)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 1)
        self.side = nn.Linear(16, 1)
        self.boom = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.tanh(self.enc(x))
        out = self.head(h) + 1e-8 * self.side(h) + 3 * self.boom(x)
        return ((out.squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def fit_planted(tmp_path: Path, guard: GradGuard, max_steps: int = 6, **kwargs):
    """``max_steps`` steps of :class:`Planted` under ``guard``, logged to TensorBoard unless ``logger`` is given."""
    return fit(tmp_path, Planted(), guard, n=64, tensorboard=True, max_steps=max_steps, **kwargs)


def images(trainer) -> dict[int, np.ndarray]:
    acc = events(trainer)
    if FLOW_TAG not in acc.Tags()["images"]:
        return {}
    return {e.step: np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
            for e in acc.Images(FLOW_TAG)}  # fmt: skip


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def fill(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The colours of a row's cells: its top two pixel lines (above the mark a value outside the scale gets), one
    RGB per pixel column."""
    x0, y0, x1, _ = box
    return image[y0 : y0 + 2, x0:x1].mean(axis=0)


def band(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The colours across the middle of a row (where a value outside the scale is marked), one RGB per pixel column."""
    x0, y0, x1, y1 = box
    return image[(y0 + y1) // 2 - 1, x0:x1].astype(np.float64)


def test_flow_picture_in_tensorboard_shows_a_vanishing_layer_darkest_and_an_exploding_one_brightest(tmp_path):
    guard = GradGuard(log_every_n_steps=1, flow_every=2)
    trainer = fit_planted(tmp_path, guard, max_steps=6)
    pictures = images(trainer)
    assert sorted(pictures) == [0, 2, 4, 5]  # the first logged step, every 2nd after it, and the end
    final = guard._dashboard.flow_picture()
    assert final.keys == ["enc", "head", "side", "boom"]  # model order
    image = pictures[5]
    assert image.shape == final.image.shape
    assert (image == final.image).all()
    assert guard._dashboard._flow["grad_norm"].steps() == [(s, s) for s in range(6)]  # one column per logged step
    rows = {key: float(luminance(fill(image, final.row_box("grad_norm", key))).mean()) for key in final.keys}
    assert min(rows, key=rows.get) == "side"
    assert max(rows, key=rows.get) == "boom"
    assert list(final.panels) == ["grad_norm"]  # no update-ratio panel unless update_ratio=True
    low, high = final.scales["grad_norm"]
    assert (low, high) == SCALES["grad_norm"]
    # side's norms (about 3e-8) lie below the fixed scale: drawn in its lowest colour, a white mark across
    assert (band(image, final.row_box("grad_norm", "side")) == 255).all()
    assert not (band(image, final.row_box("grad_norm", "boom")) == 255).all(axis=1).any()


def test_flow_picture_values_are_the_logged_module_norms(tmp_path):
    guard = GradGuard(log_every_n_steps=1)
    trainer = fit_planted(tmp_path, guard, max_steps=3)
    acc = events(trainer)
    history = guard._dashboard._flow["grad_norm"]
    values, flags = history.matrix(["enc", "head", "side", "boom"])
    assert (flags == 0).all()
    for r, key in enumerate(["enc", "head", "side", "boom"]):
        logged = {e.step: e.value for e in acc.Scalars(f"gradguard/grad_norm/{key}")}
        assert values[r].tolist() == pytest.approx([logged[s] for s in (0, 1, 2)], rel=1e-6)
    assert values[2].max() < 1e-6 * values[3].min()  # side vanishes next to boom, by construction


def test_flow_png_beside_the_report_decodes_and_the_report_names_it(tmp_path):
    guard = GradGuard(log_every_n_steps=1, update_ratio=True)
    trainer = fit_planted(tmp_path, guard, max_steps=4)
    png = Path(trainer.logger.log_dir) / FLOW_FILE
    assert png.is_file()
    pixels = np.asarray(Image.open(png).convert("RGB"))
    final = guard._dashboard.flow_picture()
    assert (pixels == final.image).all()
    assert list(final.panels) == ["grad_norm", "update_ratio"]
    assert guard._dashboard.flow_path == str(png)
    report = json.loads((Path(trainer.logger.log_dir) / REPORT_FILE).read_text())
    assert any(str(png) in note for note in report["notes"])
    assert str(png) in guard.report.table()
    ratios, flags = guard._dashboard._flow["update_ratio"].matrix(final.keys)
    assert (flags == 0).all()
    assert ((ratios > 0) & (ratios < 1)).all()


def test_flow_picture_of_a_long_run_keeps_at_most_flow_columns(tmp_path, monkeypatch):
    # Not an option: GradGuard's Dashboard reads the module's FLOW_COLUMNS (200, filled only after 200 logged steps)
    # when a run's first picture starts.
    monkeypatch.setattr("lightning_gradguard.dashboard.FLOW_COLUMNS", 4)
    guard = GradGuard(log_every_n_steps=1)
    fit_planted(tmp_path, guard, max_steps=10)
    history = guard._dashboard._flow["grad_norm"]
    assert history.steps() == [(0, 3), (4, 7), (8, 9)]


@pytest.mark.parametrize("norms", ["param", "total"])
def test_flow_rows_are_modules_whatever_norms_logs(tmp_path, norms):
    guard = GradGuard(log_every_n_steps=1, norms=norms)
    fit_planted(tmp_path, guard, max_steps=2)
    assert guard._dashboard.flow_picture().keys == ["enc", "head", "side", "boom"]


def test_flow_every_zero_draws_nothing(tmp_path):
    guard = GradGuard(log_every_n_steps=1, flow_every=0)
    trainer = fit_planted(tmp_path, guard, max_steps=2)
    assert images(trainer) == {}
    assert not (Path(trainer.logger.log_dir) / FLOW_FILE).exists()
    assert guard._dashboard._flow == {}


def test_flow_no_picture_without_a_logger(tmp_path):
    guard = GradGuard(log_every_n_steps=1)
    fit_planted(tmp_path, guard, max_steps=2, logger=False)
    assert not list(tmp_path.rglob(FLOW_FILE))


def test_flow_png_with_a_csv_logger_only(tmp_path):
    guard = GradGuard(log_every_n_steps=1)
    trainer = fit_planted(tmp_path, guard, max_steps=2, logger=CSVLogger(tmp_path, name="csv"))
    png = Path(trainer.logger.log_dir) / FLOW_FILE
    assert (np.asarray(Image.open(png).convert("RGB")) == guard._dashboard.flow_picture().image).all()


@pytest.mark.parametrize("value", [-1, 1.5])
def test_flow_options_are_checked(value):
    with pytest.raises(ValueError, match=rf"`GradGuard\(flow_every={value!r}\)`"):
        Dashboard(flow_every=value)
    with pytest.raises(ValueError, match=rf"`GradGuard\(flow_every={value!r}\)`"):
        GradGuard(flow_every=value)


def test_flow_every_is_in_the_repr():
    assert "flow_every=3" in repr(GradGuard(flow_every=3))


# ---------------------------------------------------------------------------------------------------------------------
# FlowHistory and render_flow (pure)


def test_flow_history_keeps_at_most_max_columns_covering_every_step():
    history = FlowHistory(max_columns=8)
    for step in range(100):
        history.add(step, {"a": 10.0 ** (step % 4), "b": 1.0})
        assert len(history) <= 8
    spans = history.steps()
    assert spans[0][0] == 0
    assert spans[-1][1] == 99
    assert all(nxt[0] == prev[1] + 1 for prev, nxt in zip(spans, spans[1:], strict=False))  # contiguous
    assert history.stride == 16
    values, flags = history.matrix()
    assert (flags == 0).all()
    assert values[0, 0] == pytest.approx(10.0**1.5)  # geometric mean of 1, 10, 100, 1000 (x4)
    assert values[1].tolist() == pytest.approx([1.0] * len(history))


def test_flow_history_one_column_per_step_for_several_calls():
    history = FlowHistory()
    history.add(3, {"gen": 2.0})
    history.add(3, {"disc": 4.0})  # a second optimizer stepping in the same batch
    history.add(5, {"gen": 8.0})
    assert history.steps() == [(3, 3), (5, 5)]
    values, flags = history.matrix(["gen", "disc"])
    assert values[0].tolist() == pytest.approx([2.0, 8.0])
    assert flags[1].tolist() == [0, 4]  # disc not recorded at step 5


def test_flow_cells_for_zero_missing_and_nonfinite_gradients():
    history = FlowHistory()
    history.add(0, {"ok": 1.0, "zero": 0.0, "none": None, "bad": math.nan})
    history.add(1, {"ok": 2.0, "zero": 0.0, "none": None, "bad": math.inf})
    _, flags = history.matrix()
    assert flags.tolist() == [[0, 0], [1, 1], [3, 3], [2, 2]]
    picture = render_flow({"grad_norm": history})
    colours = {key: tuple(picture.image[(b := picture.row_box("grad_norm", key))[1] + 2, b[0] + 2])
               for key in picture.keys}  # fmt: skip
    assert colours["zero"] == (0, 0, 0)
    assert colours["bad"] == (228, 26, 28)
    assert colours["none"] == (190, 190, 190)
    assert colours["ok"] not in {(0, 0, 0), (228, 26, 28), (190, 190, 190), (255, 255, 255)}
    dark = {key: (luminance(picture.image[b[1] : b[3], b[0] : b[2]]) < 100).any()
            for key in ("ok", "none") for b in [picture.row_box("grad_norm", key)]}  # fmt: skip
    assert dark == {"ok": False, "none": True}  # a row without any gradient says so in the row


def cell_colour(picture, key: str, panel: str = "grad_norm") -> np.ndarray:
    x0, y0, _, _ = picture.row_box(panel, key)
    return picture.image[y0 + 1, x0 + 1].astype(np.float64)


def test_flow_colour_scale_is_the_same_in_every_run():
    """Two runs with different ranges of norms draw the same norm in the same colour (a scale per run would
    stretch each run's own range over all colours)."""
    quiet, loud = FlowHistory(), FlowHistory()
    quiet.add(0, {"enc": 1e-3, "head": 2e-3})
    loud.add(0, {"enc": 1e-3, "head": 50.0, "emb": 1e-5})
    a, b = render_flow({"grad_norm": quiet}), render_flow({"grad_norm": loud})
    assert a.scales == b.scales == {"grad_norm": SCALES["grad_norm"]}
    assert (cell_colour(a, "enc") == cell_colour(b, "enc")).all()
    assert luminance(cell_colour(b, "emb")) < luminance(cell_colour(b, "enc")) < luminance(cell_colour(b, "head"))


def test_flow_values_outside_the_scale_take_its_end_colours_and_a_mark():
    low, high = SCALES["grad_norm"]
    history = FlowHistory()
    history.add(0, {"tiny": low / 100, "low": low, "mid": 1e-2, "high": high, "huge": high * 100})
    picture = render_flow({"grad_norm": history})
    assert (cell_colour(picture, "tiny") == cell_colour(picture, "low")).all()
    assert (cell_colour(picture, "huge") == cell_colour(picture, "high")).all()
    marks = {key: band(picture.image, picture.row_box("grad_norm", key)) for key in picture.keys}
    assert (marks["tiny"] == 255).all()  # white across a cell below the scale
    assert (marks["huge"] == 0).all()  # black across a cell above it
    for key in ("low", "mid", "high"):  # on the scale: no mark
        assert (marks[key] == cell_colour(picture, key)).all()


def test_flow_lowest_norm_colour_is_far_from_the_zero_colour():
    """The scale's darkest colour must not read as black (an all-zero gradient): far apart in RGB and in
    brightness (viridis' own first colour, (68, 1, 84), is 108 from black with a luminance of 31)."""
    low, _ = SCALES["grad_norm"]
    history = FlowHistory()
    history.add(0, {"zero": 0.0, "low": low})
    picture = render_flow({"grad_norm": history})
    zero, lowest = cell_colour(picture, "zero"), cell_colour(picture, "low")
    assert tuple(zero) == (0, 0, 0)
    assert np.linalg.norm(lowest - zero) > 150
    assert luminance(lowest) - luminance(zero) > 60


#: TensorBoard's Images tab shows an image 350 CSS pixels wide until "Show actual image size" is ticked (its
#: `tf-image-loader`: `:host { width: 350px }` and `img { width: 100% }`).
TENSORBOARD_IMAGE_WIDTH = 350


@pytest.mark.parametrize("rows", [3, 100])
def test_flow_row_labels_are_readable_at_tensorboards_default_image_size(rows):
    """Each row label's ink (a name with ascenders and digits, no descenders), scaled to TensorBoard's default
    display, is at least 8 pixels high: about TensorBoard's own 11-12 px text."""
    keys = [f"blocks.{i}.attn" for i in range(rows)]
    history = FlowHistory()
    history.add(0, dict.fromkeys(keys, 1e-2))
    picture = render_flow({"grad_norm": history}, keys)
    assert picture.image.shape[1] == WIDTH
    scale = TENSORBOARD_IMAGE_WIDTH / picture.image.shape[1]
    for key in (keys[0], keys[-1]):
        x0, y0, _, y1 = picture.row_box("grad_norm", key)
        ink = np.flatnonzero((luminance(picture.image[y0:y1, :x0]) < 128).any(axis=1))
        assert ink.size, key
        assert (ink[-1] - ink[0] + 1) * scale >= 8, (key, ink[-1] - ink[0] + 1)


def test_flow_long_row_labels_keep_their_end_and_leave_the_heatmap_most_of_the_width():
    name = "model.encoder.layers.11.self_attention.query_key_value.lora_A"
    history = FlowHistory()
    history.add(0, {name: 1.0, "head": 1.0})
    picture = render_flow({"grad_norm": history})
    x0, _, x1, _ = picture.panels["grad_norm"]
    assert x1 - x0 >= WIDTH // 2
    font = _load_font(22)
    short = _shorten(name, font, 200)
    assert short.startswith("…")
    assert name.endswith(short[1:])
    assert font.getlength(short) <= 200
    assert short[1:].split(".")[0] in name.split(".")  # cut between dotted parts


def test_flow_history_rejects_a_bad_size():
    with pytest.raises(ValueError, match=r"max_columns=1"):
        FlowHistory(max_columns=1)


def test_render_flow_without_data_says_so():
    picture = render_flow({"grad_norm": FlowHistory()})
    assert picture.panels == {}
    assert picture.image.ndim == 3
