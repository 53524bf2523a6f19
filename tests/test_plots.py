"""Plots are real PNG files with the expected pixel size."""
import numpy as np
from PIL import Image

from pipeline.eval.plots import bar_chart, confusion_matrix_plot, training_curves


def test_plots_write_pngs(tmp_path):
    hist = [{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "val_acc": e / 5, "lr": 1e-3}
            for e in range(5)]
    for path in (training_curves(hist, tmp_path / "c.png", "t"),
                 confusion_matrix_plot(np.array([[3, 1], [0, 4]]), ["a", "b"], tmp_path / "m.png"),
                 bar_chart({"rgb": 0.5, "stfn": 0.9}, tmp_path / "b.png", errors={"rgb": 0.05})):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
