"""DIR/train.html of `cafi train sddfiqa`: the training loss and held-out SRCC per epoch, the pseudo-label
histogram and the held-out predicted-vs-label scatter. One self-contained page (cafi/charts.py: inline
SVG, nothing loaded when viewed), in the run report's style."""

from __future__ import annotations

import numpy as np

from cafi.charts import DEFAULT_COLOR, Series, esc, histogram_svg, line_chart_svg, num, page, scatter_svg, table_html


def render(doc: dict, pred: np.ndarray, label: np.ndarray) -> str:
    hist = doc["labels"]["histogram"]
    epochs = doc["epochs"]
    xs = np.array([e["epoch"] for e in epochs], float)
    x_range = (0.0, max(1.0, float(xs.max()) if len(xs) else 1.0))
    loss = np.array([e["train_loss"] for e in epochs], float)
    srcc = np.array([e["heldout_srcc"] if e["heldout_srcc"] is not None else np.nan for e in epochs], float)
    loss_hi = float(np.nanmax(loss)) * 1.05 if len(loss) and np.isfinite(loss).any() else 1.0
    lo = float(min(0.0, np.nanmin(pred))) if len(pred) else 0.0
    hi = float(max(100.0, np.nanmax(pred))) if len(pred) else 100.0
    init = doc["init"]
    rows = [("run", doc["run"]), ("identities", doc["identities_file"] or f"kept column {doc['identity_column']}"),
            ("started from", init["source"] + (f" ({init['uri']}, sha256 {init['sha256']})" if init["uri"] else "")),
            ("arch", f"{doc['arch']['name']} (width {doc['arch']['width']}, units {doc['arch']['units']})"
                     if "width" in doc["arch"] else f"{doc['arch']['name']} ({doc['arch']['backbone']})"),
            ("split", f"{doc['split']['train_rows']} training, {doc['split']['heldout_rows']} held-out rows "
                      f"({doc['split']['heldout_identities']} identities)"),
            ("epochs", f"{doc['training']['epochs_done']} of {doc['training']['epochs']}"),
            ("held-out SRCC", num(doc["heldout_srcc"])),
            ("weights", f"{doc['weights']['uri']} (sha256 {doc['weights']['sha256']})")]
    body = "".join([
        "<h1>SDD-FIQA training</h1>",
        f"<p>{esc(init.get('note', ''))}</p>" if init["source"] == "random" else "",
        table_html(["", ""], rows),
        line_chart_svg("loss", "training loss (Smooth L1) per epoch", [Series("train loss", xs, loss, step=False)],
                       x_range, (0.0, loss_hi), "epoch", "loss"),
        line_chart_svg("srcc", "held-out SRCC (prediction vs pseudo-label) per epoch",
                       [Series("held-out SRCC", xs, srcc, step=False)], x_range, (-1.0, 1.0), "epoch", "SRCC"),
        histogram_svg("labels", "pseudo-labels", np.asarray(hist["edges"], float),
                      {"labelled": np.asarray(hist["counts"], float)}, {"labelled": DEFAULT_COLOR}, x_label="label"),
        scatter_svg("heldout", "held-out faces: predicted quality vs pseudo-label", np.asarray(label, float),
                    np.asarray(pred, float), np.full(len(pred), "held-out"), {"held-out": DEFAULT_COLOR},
                    (0.0, 100.0), (lo, hi), "pseudo-label", "predicted",
                    note=f"SRCC {num(doc['heldout_srcc'])}, {len(pred)} faces", empty_text="no held-out faces"),
        table_html(["epoch", "train loss", "faces", "faces/s", "held-out SRCC", "held-out loss"],
                   [(e["epoch"], num(e["train_loss"]), e["train_images"], e["images_per_second"],
                     num(e["heldout_srcc"]), num(e["heldout_loss"])) for e in epochs], numeric=range(6)),
    ])
    return page("SDD-FIQA training", body)
