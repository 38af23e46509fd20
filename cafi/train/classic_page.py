"""DIR/train.html of `cafi train classic`: what was trained on what, the held-out confusion matrix and
accuracy, the losses of each training stage, and the held-out score by true class. One self-contained
page (cafi/charts.py: inline SVG, nothing loaded when viewed), in the run report's style."""

from __future__ import annotations

import numpy as np

from cafi.charts import PALETTE, Series, histogram_svg, line_chart_svg, num, page, table_html


def render(doc: dict, held_scores: np.ndarray, held_labels: np.ndarray) -> str:
    classes = doc["classes"]
    held = doc["heldout"]
    rows = [("labels", doc["labels"]), ("run", doc["run"]),
            ("recognizer (CNN feature)", model_text(doc["embedding_model"])),
            ("faces", f"{doc['rows']['used']} of {doc['rows']['labelled']} labelled URIs "
                      f"({doc['rows']['not_found']} not faces of the run with landmarks and an embedding)"),
            ("split", f"{doc['split']['train_rows']} training, {doc['split']['heldout_rows']} held-out rows "
                      f"(by {doc['split']['by']}, stratified by class)"),
            ("held-out accuracy", num(doc["heldout_accuracy"])), ("training accuracy", num(doc["train"]["accuracy"])),
            ("weights", f"{doc['weights']['uri']} (sha256 {doc['weights']['sha256']})")]
    confusion = [(f"true {c}", *held["confusion"][i], num(held["recall"][c])) for i, c in enumerate(classes)]
    losses = doc["losses"]
    curves = [Series(name, np.arange(1, len(v) + 1, dtype=float), np.asarray(v, float), PALETTE[i % len(PALETTE)],
                     step=False) for i, (name, v) in enumerate(losses.items())]
    longest = max((len(v) for v in losses.values()), default=1)
    top = max((max(v) for v in losses.values() if v), default=1.0) * 1.05
    edges = np.linspace(0.0, 1.0, 21)
    counts = {c: np.histogram(held_scores[held_labels == i], edges)[0].astype(float) for i, c in enumerate(classes)}
    body = "".join([
        "<h1>Score-based FQA classifier training</h1>",
        table_html(["", ""], rows),
        "<h2>Held-out confusion matrix</h2>",
        table_html(["", *[f"predicted {c}" for c in classes], "recall"], confusion, numeric=range(1, 5)),
        histogram_svg("scores", "held-out score P(good) + 0.5 P(average), by true class", edges, counts,
                      {c: PALETTE[i] for i, c in enumerate(classes)}, x_label="score", empty_text="no held-out faces"),
        line_chart_svg("losses", "training loss per epoch, each stage", curves, (1.0, float(max(longest, 2))),
                       (0.0, float(top if np.isfinite(top) and top > 0 else 1.0)), "epoch", "loss"),
    ])
    return page("classic FQA training", body)


def model_text(model: dict | None) -> str:
    if not model:
        return "not recorded by the run"
    return f"{model.get('stage')} {model.get('arch')} (sha256 {model.get('sha256')})"
