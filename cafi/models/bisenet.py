"""BiSeNet face parsing (facexlib `parsing_bisenet.pth`, from face-parsing.PyTorch).

19 CelebAMask-HQ classes in face-parsing.PyTorch's order.
"""

from __future__ import annotations

LABELS = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)


def build():
    from facexlib.parsing.bisenet import BiSeNet  # torch and facexlib only where a model is built

    return BiSeNet(num_class=len(LABELS)).eval()


def logits(net, x):
    """Per-pixel class logits (N, 19, H, W) at the input resolution: facexlib's forward without
    its two auxiliary (training-only) heads, which it would also upsample to full size."""
    import torch.nn.functional as F

    h, w = x.shape[2:]
    feat_res8, feat_cp8, _ = net.cp(x)
    out, _ = net.conv_out(net.ffm(feat_res8, feat_cp8))
    return F.interpolate(out, (h, w), mode="bilinear", align_corners=True)
