"""CT volumes in and label volumes out: NIfTI, DICOM series and the sample's .mrc."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class CTVolume:
    """A CT scan as plain arrays.

    hu: float32 ``(z, y, x)`` Hounsfield units, axis 0 axial.
    spacing: ``(z, y, x)`` voxel size in mm, or ``None`` when the source does not record it.
    affine: 4x4 mapping ``(z, y, x, 1)`` voxel indices to world mm, or ``None`` if unknown.
    label: uint8 ``(z, y, x)`` with 0 background, 1 liver, 2 tumour, or ``None``.
    source: where it was read from.
    meta: what the writer needs to put a label back into the source geometry.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float] | None = None
    affine: np.ndarray | None = None
    label: np.ndarray | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]
