"""Fast paths: torch.compile behind models.compile, and the CUDA path (autocast, channels_last,
pinned copies) against the CPU's fp32 scores. The CUDA tests run on a GPU machine only."""

import os

import numpy as np
import pytest
import torch

from cafi.config import load_config
from cafi.models.registry import PUBLISHED
from cafi.models.retinaface import FaceDetector
from cafi.models.runtime import prepare, to_input
from cafi.samples import draw_face
from cafi.stages.actor import FusedModels
from cafi.weights import Checkpoint, sha256_of

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the lent GPU machine)")


def _batch(images: np.ndarray) -> dict:
    n = len(images)
    return {"uri": np.array([f"mem://{i}" for i in range(n)], dtype=object),
            "status": np.full(n, "ok", dtype=object), "error": np.full(n, "", dtype=object),
            "width": np.full(n, images.shape[2], np.int32), "height": np.full(n, images.shape[1], np.int32),
            "image": images.copy()}


def _detector(synth_dir, device: str, **kw) -> FaceDetector:
    path = os.path.join(synth_dir, PUBLISHED["retinaface_mobile0.25"].file_name)
    return FaceDetector("retinaface_mobile0.25", Checkpoint("detector", path, sha256_of(path), None), "/tmp",
                        torch.device(device), **kw)


def test_inputs_are_channels_last_and_models_prepared_for_inference(synth_dir):
    det = _detector(synth_dir, "cpu")
    x = to_input(np.stack([draw_face(64, 0)]), torch.device("cpu"), det.record)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32
    assert not det.net.training
    assert not prepare(torch.nn.Conv2d(3, 8, 3).train(), torch.device("cpu")).training


@needs_cuda
def test_cuda_models_hold_channels_last_weights_and_pinned_copies_land_on_the_gpu(synth_dir):
    det = _detector(synth_dir, "cuda")
    conv = next(m for m in det.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_cuda and conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = to_input(np.stack([draw_face(64, 0)]), torch.device("cuda"), det.record)
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow  # torch.compile on the CPU: about a minute
def test_compile_switch_scores_like_eager(synth_dir):
    """models.compile=true runs the same detector through torch.compile: same outputs."""
    images = np.stack([draw_face(64, s) for s in range(2)])
    eager = _detector(synth_dir, "cpu")(images)
    compiled = _detector(synth_dir, "cpu", compile=True)
    assert compiled.forward is not compiled.net  # really wrapped by torch.compile
    got = compiled(images)
    np.testing.assert_allclose(got.score, eager.score, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.landmarks, eager.landmarks, rtol=1e-4, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_model_stages_on_cuda_track_cpu_fp32(synth_config, precision):
    """The four stages on the GPU (pinned copies, channels_last, autocast) score what the CPU scores."""
    images = np.stack([draw_face(384, s) for s in range(4)])
    out = {}
    for device, prec in (("cpu", "fp32"), ("cuda", precision)):
        cfg = load_config([synth_config], ["input.uri=/dev/null", "output.uri=/tmp/unused", "models.serfiq.samples=16",
                                           f"models.device={device}", f"models.precision={prec}"])
        out[device] = FusedModels(cfg)(_batch(images))
    ref, got = out["cpu"], out["cuda"]
    assert list(got["status"]) == list(ref["status"])
    tol = {"fp32": 2e-2, "fp16": 6e-2, "bf16": 1.2e-1}[precision]  # TF32 convolutions count as fp32 on CUDA
    np.testing.assert_allclose(got["det_score"], ref["det_score"], atol=tol)
    np.testing.assert_allclose(got["landmarks"], ref["landmarks"], atol=384 * tol)
    np.testing.assert_allclose(got["mask_fraction"], ref["mask_fraction"], atol=tol)
    np.testing.assert_allclose(got["serfiq_raw"], ref["serfiq_raw"], atol=tol)
    np.testing.assert_allclose(got["dbcnn"], ref["dbcnn"], rtol=tol, atol=tol)
