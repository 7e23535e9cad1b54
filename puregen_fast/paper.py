"""The paper's purification chain (arXiv 2405.18627, DESIGN 2.1), defined once.

Every default step count, step size and temperature of the package (and the JPEG baseline's
quality) is one of these names: the
configuration, the reference, the samplers, the engine, training and the benchmarks take them from
here. A leaf: it imports nothing, so any layer may read it (the sampling layer without the data
readers that `config` imports).
"""

from __future__ import annotations

__all__ = ["DDPM_STEPS", "JPEG_QUALITY", "LANGEVIN_EPS", "LANGEVIN_STEPS", "LANGEVIN_TEMP"]

LANGEVIN_STEPS = 150  # EBM Langevin steps
LANGEVIN_EPS = 1.25e-2  # Langevin step size
LANGEVIN_TEMP = 1e-4  # Langevin temperature
DDPM_STEPS = 75  # the DDPM's noising timestep: noised at 75, denoised from 74 to 0
JPEG_QUALITY = 75  # the JPEG baseline's quality (Pillow's own default)
