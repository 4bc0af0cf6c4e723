"""The torchvision shim acts only when torchvision's extension cannot load, and never breaks a matched install.

Each check runs in a fresh interpreter: the shim's decision is made once per process, before torchvision is first
imported, and a wrong decision on a matched install aborts the process (exit 134), which no in-process test could
observe. The CUDA-wheel install itself is exercised by ``.ci/cuda-install``.
"""

from __future__ import annotations

import subprocess
import sys

from raddino._compat import torchvision_extension


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_raddino_then_torchvision_and_timm():
    done = _python("import raddino, torchvision, timm; import torchvision.transforms.v2; print('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_shim_acts_exactly_when_the_extension_does_not_load():
    extension = torchvision_extension()
    assert extension is not None, "torchvision is a hard dependency and ships its _C extension"
    # Independent of the shim: does the dynamic loader accept the extension next to this torch?
    probe = _python(
        f"import ctypes, torch, sys\ntry:\n    ctypes.CDLL({str(extension)!r})\nexcept OSError:\n    sys.exit(1)\n"
    )
    assert probe.returncode in (0, 1), probe.stderr[-2000:]
    loads = probe.returncode == 0
    decided = _python(
        "import raddino._compat as c, torch\n"
        "lib = c.ensure_torchvision_importable()\n"
        "print('defined' if lib is not None else 'none', hasattr(torch.ops.torchvision, 'nms'))"
    )
    assert decided.returncode == 0, decided.stderr[-2000:]
    action, has_nms = decided.stdout.split()
    assert action == ("none" if loads else "defined"), (loads, decided.stdout)
    assert has_nms == "True"  # either torchvision's extension or the shim defined the schema


def test_without_torchvision_the_shim_does_nothing():
    """A package path where torchvision is absent (find_spec -> None): nothing is defined."""
    code = (
        "import sys, importlib.util\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'torchvision' else real(name, *a)\n"
        "import raddino._compat as c\n"
        "print(c.ensure_torchvision_importable() is None, c.torchvision_extension() is None)"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True"]
