"""Where a CT's air lies, to tell Hounsfield units from stored values and from a second rescale.

CT-RATE ships v1 volumes as stored values (air near 0 with intercept -1024) and v2 volumes already
in HU (REFERENCE; applying slope/intercept to v2 again is CT-CLIP's issues #28/#50). Air, which every
chest CT holds around the body and in the lungs, is where the three differ: near -1000 in HU, near 0
as stored values, near -2048 after a second rescale. :func:`air_level` measures it;
``medfuse data check`` (the ``hu`` rule, :mod:`medfuse.data.checks`) and the ct_encoder family's HU
step (:mod:`medfuse.families.ct_encoder.hu`) judge it with the bounds below.
"""

from __future__ import annotations

import numpy as np

AIR_HU = -1024.0
BELOW_AIR = 600.0
"""After slope/intercept, an air level under AIR_HU - 600 (-1624 HU) is a second rescale: air lands near -2048."""
ABOVE_AIR = 500.0
"""Read as HU, an air level over AIR_HU + 500 (-524 HU) is not HU: stored values (v1) put air near 0."""


def air_level(array: np.ndarray) -> tuple[float, float | None]:
    """Where a CT's air lies: the 1st percentile of its voxels (one in 16 of a large volume), with
    the voxels at the volume's minimum left out, as they are the fill outside the scan circle
    (-1024, -2048 or -3024 HU; -2000 or -1024 stored) or air clipped at the scanner's floor.

    A chest CT in HU puts it near -1000 (air around the body, the lungs: whatever the fill); stored
    values with intercept -1024 (CT-RATE v1) put it near 0; HU rescaled a second time near -2048.

    Returns:
        ``(level, fill)``: ``fill`` is the minimum left out when it holds at least 1% of the voxels
        and lies 100 or more below the next value (padding, worth naming in a message; clipped air
        is not), else None; ``level`` is NaN for a volume of non-finite values.
    """
    a = np.asarray(array)
    step = 4 if a.size >= 4_000_000 else 1
    sample = a[..., ::step, ::step].astype(np.float32, copy=False).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return float("nan"), None
    lo = float(sample.min())
    rest = sample[sample > lo]
    gap = float(rest.min()) - lo if rest.size else 0.0
    fill = lo if sample.size - rest.size >= 0.01 * sample.size and gap >= 100 else None
    return float(np.percentile(rest if rest.size else sample, 1)), fill
