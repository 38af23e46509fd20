"""The environment the README's install command builds: headless OpenCV, facexlib importable."""

import importlib.metadata as md
import subprocess
import sys


def test_cv2_is_the_headless_build_and_imports_without_display_libraries():
    names = {d.metadata["Name"].lower() for d in md.distributions()}
    assert "opencv-python-headless" in names
    assert "opencv-python" not in names, "facexlib's opencv-python dependency replaced the headless cv2"
    # The cv2 package on disk belongs to the headless distribution.
    files = {str(f) for f in md.files("opencv-python-headless") or []}
    assert any(f.startswith("cv2/") for f in files)
    # A fresh interpreter imports cv2 and facexlib with no display at all.
    code = "import cv2, facexlib; import numpy as np; cv2.resize(np.zeros((4, 4, 3), np.uint8), (2, 2))"
    env = {"PATH": "/usr/bin:/bin", "DISPLAY": ""}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_console_script_is_installed():
    eps = [ep for ep in md.entry_points(group="console_scripts") if ep.name == "cafi"]
    assert eps and eps[0].value == "cafi.cli:main"
