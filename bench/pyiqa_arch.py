"""Import one of pyiqa's architecture modules from a checkout, without pyiqa's package __init__ files
(they import every metric and its dependencies). Used by the parity benches; nothing is downloaded.

The packages `pyiqa`, `pyiqa.archs`, `pyiqa.utils` and `pyiqa.data` are registered as empty namespaces
pointing into the checkout; `huggingface_hub.hf_hub_url` (arch_util builds its URL strings with it) is
stubbed where the installed one cannot be imported. Returns the module, pyiqa's arch_util and the
list of what was done (printed by the benches).
"""

from __future__ import annotations

import importlib
import os
import sys
import types


def import_pyiqa_arch(root: str, module: str, stubs: dict[str, dict] | None = None):
    """`stubs`: module name -> attributes, registered as modules before the import (backbones the
    compared configuration never builds, whose own imports would pull in more)."""
    root = os.path.abspath(root)
    steps = []
    for name in ("pyiqa", "pyiqa.archs", "pyiqa.utils", "pyiqa.data"):
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(root, *name.split("."))]
        sys.modules[name] = pkg
        steps.append(f"namespace {name} -> {name.replace('.', '/')}/ (its __init__ not run)")
    for name, attrs in (stubs or {}).items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        steps.append(f"stub {name} ({', '.join(attrs)}: not built in this comparison)")
    try:
        from huggingface_hub import hf_hub_url  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - missing, or a version whose own imports fail here
        hub = types.ModuleType("huggingface_hub")
        hub.hf_hub_url = lambda repo_id, filename: f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
        sys.modules["huggingface_hub"] = hub
        steps.append(f"stub huggingface_hub.hf_hub_url (URL strings only; the real one: {type(exc).__name__})")
    for dep in ("pyiqa.archs.constants", "pyiqa.utils.registry", "pyiqa.utils.download_util", "pyiqa.archs.arch_util"):
        importlib.import_module(dep)
        steps.append(f"import {dep} from the checkout")
    arch = importlib.import_module(f"pyiqa.archs.{module}")
    steps.append(f"import pyiqa.archs.{module} from the checkout")
    return arch, importlib.import_module("pyiqa.archs.arch_util"), steps
