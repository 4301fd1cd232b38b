"""vioasid: a virtual IOMMU PASID emulator that runs beside QEMU.

Layers, importing only downward: ``vioasid.formats`` (binary layouts) ← ``vioasid.model``
(sans-IO logic) ← ``vioasid.daemon`` (asyncio server) ← ``vioasid.cli``.
"""

__version__ = "0.1.0"
