"""Is there NVIDIA GPU hardware on this host, whatever the driver says?

Tells "no GPU here" (use the CPU backend, nothing is wrong) from "a GPU is
here but NVML cannot reach it" (a broken or missing driver: an admin must
act). Reads sysfs only, so it works when the driver does not.
"""

from __future__ import annotations

from pathlib import Path

NVIDIA_VENDOR = "0x10de"
DISPLAY_CLASS = "0x03"  # 0x0300 VGA, 0x0302 3D controller (data-centre GPUs)
SYSFS_PCI = "/sys/bus/pci/devices"


def nvidia_gpus(root: str = SYSFS_PCI) -> list[str]:
    """PCI addresses of NVIDIA display/3D controllers; [] when none or no sysfs."""
    found: list[str] = []
    try:
        entries = sorted(Path(root).iterdir())
    except OSError:
        return found
    for entry in entries:
        try:
            vendor = (entry / "vendor").read_text().strip().lower()
            klass = (entry / "class").read_text().strip().lower()
        except OSError:
            continue
        if vendor == NVIDIA_VENDOR and klass.startswith(DISPLAY_CLASS):
            found.append(entry.name)
    return found
