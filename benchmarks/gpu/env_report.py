"""What the device offers: Python, torch, triton, transformers, xxhash, pytest, the GPU.

Exits 1 when torch sees no GPU or a required import (torch, triton) fails; optional ones are
only reported.
"""

from __future__ import annotations

import importlib
import platform
import sys

REQUIRED = ("torch", "triton")
OPTIONAL = ("xxhash", "transformers", "pytest", "numpy")


def main() -> int:
    print(f"python {platform.python_version()} ({sys.executable})")
    ok = True
    for name in REQUIRED + OPTIONAL:
        try:
            mod = importlib.import_module(name)
            print(f"{name} {getattr(mod, '__version__', '?')}")
        except Exception as e:
            print(f"{name}: missing ({type(e).__name__}: {e})")
            ok = ok and name not in REQUIRED
    try:
        import torch

        if not torch.cuda.is_available():
            print("no GPU visible to torch")
            return 1
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                  f"{p.total_memory / 2**30:.0f} GiB")
    except Exception as e:
        print(f"torch.cuda failed: {type(e).__name__}: {e}")
        return 1
    for mod in ("kvquant", "prefix_index", "paged_engine"):
        try:
            importlib.import_module(mod)
            print(f"{mod}: importable")
        except Exception as e:
            print(f"{mod}: not importable ({type(e).__name__}: {e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
