"""What machine a benchmark ran on (every results file records it): the CPU's name and its
instruction-set features, as the server reports them (freelunch.cpu_features)."""

from __future__ import annotations

import os

from freelunch.cpu_features import cpu_features, cpu_name, isa_level


def machine() -> dict:
    return {"cpu": cpu_name(), "isa": isa_level(), "features": cpu_features(), "cores": os.cpu_count()}
