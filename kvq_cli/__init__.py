"""kvq: adaptive per-token KV-cache quantization for small LLMs on-device."""
import os

# llama.cpp's threads own the cores. NumPy's work here is small matrices (training damage, scoring);
# OpenBLAS's own threads spin against llama.cpp's: 10 calibration prompts took 100 s instead of
# 14.5 s on 2 busy cores (docs/controller.md, "Calibration"). Set before NumPy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
