"""ParseNet face parsing (facexlib `parsing_parsenet.pth`, from PSFRGAN).

19 CelebAMask-HQ classes in the dataset's own order, which differs from BiSeNet's.
"""

from __future__ import annotations

LABELS = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)


def build():
    from facexlib.parsing.parsenet import ParseNet  # torch and facexlib only where a model is built

    return ParseNet(in_size=512, out_size=512, parsing_ch=len(LABELS)).eval()


def logits(net, x):
    """Per-pixel class logits (N, 19, H, W); the second output (a restored image) is unused."""
    return net(x)[0]
