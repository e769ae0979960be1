"""The machine a measurement ran on: every committed speed or memory figure names its CPU."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary() -> str:
    """CPU model and core count, e.g. "AMD EPYC 7B13, 2 cores"."""
    return f"{cpu_name()}, {os.cpu_count()} cores"
