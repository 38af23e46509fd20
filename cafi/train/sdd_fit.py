"""Training the SDD-FIQA regressor on a run's pseudo-labels with Ray Train (TorchTrainer), as TFace's
quality/train.py does: the aligned 112x112 face -> its 0..100 pseudo-label, Smooth L1 loss, Adam (its
learning rate decayed along a half cosine over the epochs), random horizontal flips, the faces shuffled
within a buffer each epoch. The regressor is TFace's IR-50, or (backbone maniqa) MANIQA in its place, as
the seed team trained it.

The datasets are cafi/train/faces.py's (faces re-aligned from the run's landmarks, a `label` column),
split by identity (cafi/train/split.py). One checkpoint per epoch (weights, optimiser, history) under
DIR/ray; a run started again with the same DIR resumes from its latest checkpoint (Ray Train restores
the run of the same name and storage path).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import numpy as np

from cafi.train.faces import to_input
from cafi.train.split import rank_correlation

log = logging.getLogger(__name__)

RUN_NAME = "sddfiqa"
STATE_FILE = "state.pt"
HELDOUT_FILE = "heldout.npz"
SHUFFLE_BUFFER = 1024  # faces mixed before each training batch (~37 MiB of 112x112 faces)


def epoch_lr(lr: float, epoch: int, epochs: int) -> float:
    """Adam's learning rate in epoch `epoch` (0-based): `lr` decayed along a half cosine to lr/20."""
    import math

    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1))))


def build_net(config: dict):
    """The regressor being trained: TFace's IR-50 (config width, units), or MANIQA in its place
    (config backbone: the sddfiqa arch, cafi.models.maniqa.FaceRegressor). Either maps normalised faces
    to (N,) or (N, 1) scores."""
    backbone = config.get("backbone", "ir50")
    if backbone == "ir50":
        from cafi.models.sddfiqa import build

        return build(config["width"], tuple(config["units"]))
    import torch

    from cafi.models.maniqa import build_regressor

    net = build_regressor(backbone)
    # From random weights MANIQA's score head (a ReLU last) can start dead: every face 0, no gradient. Its
    # last bias starts at the labels' middle (50 of 0..100) instead; weights to start from replace it.
    torch.nn.init.constant_(net.fc_score[3].bias, 50.0)
    return net


def _progress(config: dict, epoch: int, rank: int):
    """Rank 0's progress bar over one epoch's batches, drawn on the driver (Ray's tqdm for remote
    workers); None on the other ranks."""
    if rank != 0:
        return None
    from ray.experimental.tqdm_ray import tqdm

    per_worker = -(-int(config.get("train_rows", 0)) // max(1, int(config.get("workers", 1))))
    return tqdm(desc=f"sddfiqa training: epoch {epoch + 1}/{config['epochs']}",
                total=-(-per_worker // config["batch_size"]), unit="batch")


def train_loop(config: dict) -> None:
    """Per Ray Train worker: resume from the latest checkpoint when there is one, then one report (and,
    on rank 0, one checkpoint) per epoch."""
    import ray.train
    import torch
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(config["seed"] * 1000 + rank)
    net = build_net(config)
    if config.get("init_state") is not None:
        net.load_state_dict(config["init_state"], strict=True)
    start, history, attempt = 0, [], 0
    opt_state = None
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"], strict=True)
        opt_state, start, history = state["optimizer"], int(state["epoch"]), list(state["history"])
        attempt = int(state.get("attempt", 0)) + 1  # each epoch's row says which start of the training ran it
        print(f"sddfiqa training: resumed from the checkpoint of epoch {start}")  # noqa: T201 - the driver shows it
    net.train()
    net = prepare_model(net)
    inner = net.module if hasattr(net, "module") else net
    opt = torch.optim.Adam(net.parameters(), lr=config["lr"])
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    loss_fn = torch.nn.SmoothL1Loss()
    device = get_device()
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    for epoch in range(start, config["epochs"]):
        started, total, seen = time.time(), 0.0, 0
        for group in opt.param_groups:  # cosine decay over --epochs: the last epochs settle the ranking
            group["lr"] = epoch_lr(config["lr"], epoch, config["epochs"])
        net.train()
        bar = _progress(config, epoch, rank)
        # shuffled within a buffer, seeded per epoch (the faces arrive in file order, an identity's together)
        for batch in train_shard.iter_torch_batches(batch_size=config["batch_size"], device=device,
                                                    local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                                    local_shuffle_seed=config["seed"] * 1000 + epoch):
            x, y = to_input(batch["image"], flip=True), batch["label"].float()
            loss = loss_fn(net(x).view(-1), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            seen += len(y)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        train_seconds = time.time() - started
        net.eval()
        preds, labels = [], []
        with torch.inference_mode():
            for batch in val_shard.iter_torch_batches(batch_size=config["batch_size"], device=device):
                preds.append(inner(to_input(batch["image"], flip=False)).view(-1).float().cpu().numpy())
                labels.append(batch["label"].float().cpu().numpy())
        pred = np.concatenate(preds) if preds else np.zeros(0, np.float32)
        lab = np.concatenate(labels) if labels else np.zeros(0, np.float32)
        row = {"epoch": epoch + 1, "train_loss": total / max(seen, 1), "train_images": seen,
               "train_seconds": round(train_seconds, 2),
               "images_per_second": round(seen / train_seconds, 2) if train_seconds > 0 else None,
               "heldout_images": len(lab), "heldout_srcc": rank_correlation(pred, lab),
               "heldout_loss": float(loss_fn(torch.from_numpy(pred), torch.from_numpy(lab))) if len(lab) else None,
               "attempt": attempt}
        history.append(row)
        print(f"sddfiqa training: epoch {row['epoch']}/{config['epochs']}: train loss {row['train_loss']:.3f} "  # noqa: T201
              f"({seen} faces, {row['images_per_second']} faces/s), held-out SRCC {row['heldout_srcc']:.3f}")
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:  # one copy of the weights; every rank reports (Ray Train waits for all)
                torch.save({"model": inner.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                            "history": history, "attempt": attempt}, os.path.join(d, STATE_FILE))
                np.savez(os.path.join(d, HELDOUT_FILE), pred=pred, label=lab)
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report({k: v for k, v in row.items() if v is not None}, checkpoint=checkpoint)


def fit(train_ds, val_ds, config: dict, out_uri: str, workers: int, use_gpu: bool):
    """Run TorchTrainer with its checkpoints under DIR/ray; returns Ray Train's Result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from cafi.train.outputs import ray_storage

    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker=None if use_gpu else {"CPU": 1}),
        run_config=ray.train.RunConfig(name=RUN_NAME, storage_path=ray_storage(out_uri),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets={"train": train_ds, "val": val_ds},
        # every worker sees the whole held-out set; one worker needs no split (nor its coordinator actor)
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"] if workers > 1 else []),
    )
    return trainer.fit()
