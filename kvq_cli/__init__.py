"""kvq: adaptive per-token KV-cache quantization for small LLMs on-device."""
import os

# llama.cpp's threads own the cores. NumPy's work here is small matrices (training damage, scoring);
# OpenBLAS's own threads spin against llama.cpp's: 5% slower calibration on an idle 2-core machine,
# far slower on a busy one (docs/controller.md, "Calibration"). Set before NumPy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
