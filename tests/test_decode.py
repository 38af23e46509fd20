"""Encoded bytes to the model actor: header checks in the read task, decoding in the actor (host
threads, or batched JPEG decoding on the device), host work overlapped with the models."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import ImageFile

from cafi import imaging
from cafi.config import ImageConfig, load_config
from cafi.decision import OK
from cafi.samples import broken_inputs, draw_face, encode, good_crops, png_flat, unusual_inputs, write_samples
from cafi.stages.actor import FusedModels
from cafi.stages.decode import Decode, square_resize_tensor
from cafi.stages.read import read_objects
from cafi.stages.specs import specs_for

CPU = torch.device("cpu")


def _byte_batch(files: dict[str, bytes]) -> dict:
    n = len(files)
    return {"uri": np.array(list(files), dtype=object), "status": np.full(n, OK, dtype=object),
            "error": np.full(n, "", dtype=object), "width": np.zeros(n, np.int32),
            "height": np.zeros(n, np.int32), "data": np.array(list(files.values()), dtype=object)}


def test_read_tasks_carry_the_file_bytes_and_refuse_what_the_header_refuses(tmp_path, monkeypatch):
    paths = write_samples(str(tmp_path), count=2, seed=3)
    cfg = load_config([], [f"input.uri={tmp_path}", "output.uri=unused"])
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1))  # no pixel may be decoded
    out = read_objects({"uri": np.array(paths, dtype=object)}, cfg)
    assert not loads
    refused = {"empty.jpg": "empty file", "text.jpg": "not an image", "tiny.png": "image too small",
               "bomb.png": "image too large"}
    for i, path in enumerate(paths):
        name = path.rsplit("/", 1)[1]
        if name in refused:
            assert out["status"][i] == "error" and refused[name] in out["error"][i]
            assert out["data"][i] == b""  # nothing travels for a refused file
        else:  # everything else travels encoded, as the file is: decoded only in the model actor
            assert out["status"][i] == OK, (name, out["error"][i])
            with open(path, "rb") as fh:
                assert out["data"][i] == fh.read()
            assert out["width"][i] > 0 and out["height"][i] > 0


def test_the_actor_decodes_as_the_read_task_used_to(tmp_path):
    """Same pixels, sizes and error texts as imaging.decode: unusual formats converted, a file that
    passes the header check but cannot be decoded becomes the same error row."""
    cfg = ImageConfig(crop_size=128)
    files = {**unusual_inputs(2), **{k: v for k, v in broken_inputs(2).items() if k in ("truncated.jpg",
                                                                                        "corrupt.jpg")}}
    out = Decode(cfg, CPU, threads=2)(_byte_batch(files))
    assert "data" not in out
    for i, (name, data) in enumerate(files.items()):
        ref = imaging.decode(data, cfg)
        if ref.error is None:
            assert out["status"][i] == OK, name
            assert np.array_equal(out["image"][i], ref.image), name
            assert (out["width"][i], out["height"][i]) == (ref.width, ref.height)
        else:
            assert out["status"][i] == "error" and out["error"][i] == ref.error, name
            assert not out["image"][i].any()


@pytest.mark.parametrize("source,size", [(384, 128), (512, 384), (300, 128), (1000, 384), (96, 128), (200, 384)])
def test_device_resize_reproduces_the_host_resize(source, size):
    img = np.asarray(draw_face(source, 1))
    img = np.clip(img + np.random.default_rng(0).normal(0, 20, img.shape), 0, 255).astype(np.uint8)[:, : source - 7]
    host = imaging.square_resize(img, size).astype(int)
    dev = square_resize_tensor(torch.from_numpy(img).permute(2, 0, 1), size).numpy().astype(int)
    assert np.abs(host - dev).max() <= 1  # INTER_AREA exactly; bicubic to one level


def test_device_jpeg_path_dry_run_scores_like_the_host_path(fast_config):
    """The batched JPEG path (torchvision's decoder; nvJPEG on a GPU) forced on the CPU: pixels within
    one level of the host path, and every score within the stated tolerance. On a GPU nvJPEG's IDCT
    adds a level or two more, measured by bench/gpu.py."""
    cfg = load_config(fast_config, ["input.uri=/in", "output.uri=/out"])
    files = {k: v for k, v in good_crops(6, seed=4).items() if k.endswith(".jpg")}
    files["upscaled.jpg"] = encode(draw_face(96, 3), "JPEG")
    files["cmyk.jpg"] = unusual_inputs(4)["cmyk.jpg"]  # not for the device: decoded on the host
    host = Decode(cfg.image, CPU)(_byte_batch(files))
    device = Decode(cfg.image, CPU, jpeg_batches=True)(_byte_batch(files))
    assert isinstance(device["image"], torch.Tensor)
    assert np.abs(host["image"].astype(int) - device["image"].numpy().astype(int)).max() <= 1
    models = FusedModels(cfg, decode=False)
    a, b = models(host), models(device)
    assert list(a["status"]) == list(b["status"])
    for col, tol in (("det_score", 1e-3), ("serfiq_raw", 1e-3), ("mask_fraction", 1e-2), ("dbcnn", 1e-2),
                     ("sharpness", 0.05), ("luma_mean", 1e-2)):
        np.testing.assert_allclose(a[col], b[col], rtol=tol, atol=tol, err_msg=col)


def test_models_run_one_batch_at_a_time_while_the_next_one_decodes(fast_config, monkeypatch):
    cfg = load_config(fast_config, ["input.uri=/in", "output.uri=/out"])
    files = {k: v for k, v in good_crops(4, seed=5).items()}
    models = FusedModels(cfg)
    spans, lock = [], threading.Lock()

    def record(start, end, rows, replica=None):
        with lock:
            spans.append((start, end))

    monkeypatch.setattr(models.telemetry, "busy", record)
    expected = [models(_byte_batch(files)) for _ in range(2)]
    results: list = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, models(_byte_batch(files))))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, ref in zip(results, expected, strict=True):
        np.testing.assert_allclose(got["dbcnn"], ref["dbcnn"], rtol=1e-5)
        np.testing.assert_allclose(got["serfiq_raw"], ref["serfiq_raw"], rtol=1e-5)
        assert "image" not in got and "data" not in got and "face_mask" not in got  # pixels stay in the actor
    spans.sort()
    assert len(spans) == 4
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans  # never two at once


class _CountThreads:
    """In front of an actor's first stage (which still runs): the calling thread's torch threads."""

    def __init__(self, stage):
        self.stage, self.seen = stage, []

    def __getattr__(self, name):
        return getattr(self.stage, name)

    def __call__(self, batch: dict) -> dict:
        self.seen.append(torch.get_num_threads())
        return self.stage(batch)


def _threads_seen(models: FusedModels) -> list[int]:
    models.stages[0] = _CountThreads(models.stages[0])
    return models.stages[0].seen


def test_cpu_replicas_run_batches_at_once_on_one_torch_thread_each_with_the_threaded_scores(fast_config):
    """ray.cpu_replicas: two batches in the models at once, each call thread on its own single torch
    thread (the constructing thread keeps its count), the same scores as one batch at a time on two
    threads; the pool takes replicas + actor_concurrency - 1 calls at once."""
    over = ["input.uri=/in", "output.uri=/out", "models.detector.torch_threads=2"]
    threaded = FusedModels(load_config(fast_config, [*over, "ray.cpu_replicas=1"]))
    replicated = FusedModels(load_config(fast_config, [*over, "ray.cpu_replicas=0"]))  # 0: one per thread
    assert (threaded.replicas, replicated.replicas, replicated.replica_threads) == (1, 2, 1)
    batches = [good_crops(2, seed=11), good_crops(2, seed=12)]
    threaded_seen, replica_seen = _threads_seen(threaded), _threads_seen(replicated)
    before = torch.get_num_threads()
    expected = [threaded(_byte_batch(files)) for files in batches]
    results: list = [None, None]
    calls = [threading.Thread(target=lambda i=i: results.__setitem__(i, replicated(_byte_batch(batches[i]))))
             for i in range(2)]
    for t in calls:
        t.start()
    for t in calls:
        t.join()
    assert threaded_seen == [2, 2] and replica_seen == [1, 1]
    assert torch.get_num_threads() == before
    replicated(_byte_batch(batches[0]))  # called from this thread: 1 thread inside, its own count after
    assert replica_seen[-1] == 1 and torch.get_num_threads() == before
    for got, ref in zip(results, expected, strict=True):
        assert list(got["status"]) == list(ref["status"])
        for col in ("det_score", "serfiq_raw", "mask_fraction", "dbcnn", "sharpness"):
            np.testing.assert_allclose(got[col], ref[col], rtol=1e-4, atol=1e-5, err_msg=col)
    assert sorted(replicated.free_replicas.get() for _ in range(2)) == [0, 1]  # both handed back
    specs = specs_for(replicated.cfg)
    calls_of = {name: FusedModels.resources(m.cfg, specs)["compute"].max_concurrent_calls_per_actor
                for name, m in (("threaded", threaded), ("replicated", replicated))}
    assert calls_of == {"threaded": 2, "replicated": 3}
    on_gpu = load_config(fast_config, [*over, "ray.cpu_replicas=0", "models.detector.num_gpus=0.5"])
    assert FusedModels.resources(on_gpu, specs)["compute"].max_concurrent_calls_per_actor == 2  # GPU: no replicas


def test_one_file_that_cannot_be_decoded_is_its_rows_error_never_a_failed_batch(monkeypatch):
    """A real 1,250,000 x 32 PNG (exactly image.max_pixels: the header check passes) is decoded in
    memory bounded by its pixels; whatever else decoding raises for one file (here a MemoryError)
    is that row's error, and the batch's other rows are decoded."""
    cfg = ImageConfig(crop_size=128)
    files = {**good_crops(2, seed=6), "line.png": png_flat(1_250_000, 32, 200)}
    out = Decode(cfg, CPU, threads=2)(_byte_batch(files))
    assert list(out["status"]) == [OK] * 3, list(out["error"])
    assert (out["width"][2], out["height"][2]) == (1_250_000, 32)  # a line far below one pixel of the crop
    real = imaging.square_resize

    def fails_for_the_first(rgb, size):
        if rgb.shape[0] == 384:
            raise MemoryError("Unable to allocate 4.26 TiB")
        return real(rgb, size)

    monkeypatch.setattr(imaging, "square_resize", fails_for_the_first)
    files = {"a.png": encode(draw_face(200, 1), "PNG"), **good_crops(1, seed=6)}
    out = Decode(cfg, CPU, threads=2)(_byte_batch(files))
    assert list(out["status"]) == [OK, "error"]
    assert out["error"][1] == "cannot decode image: Unable to allocate 4.26 TiB" and not out["image"][1].any()
    assert out["image"][0].any()


@pytest.mark.parametrize("height, width", [(24, 6000), (6000, 24), (300, 40)])
def test_device_resize_never_makes_the_square_canvas(height, width, monkeypatch):
    """The device path pads as the host does, without a max(H, W)^2 canvas for a shrink."""
    img = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    host = imaging.square_resize(img, 128).astype(int)
    real = torch.zeros

    def bounded(*shape, **kwargs):
        out = real(*shape, **kwargs)
        assert out.numel() <= 3 * 128 * 128, f"a {tuple(out.shape)} canvas"
        return out

    monkeypatch.setattr(torch, "zeros", bounded)
    dev = square_resize_tensor(torch.from_numpy(img).permute(2, 0, 1), 128).numpy().astype(int)
    assert np.abs(host - dev).max() <= 1
