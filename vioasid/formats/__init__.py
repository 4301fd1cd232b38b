"""Every binary layout vioasid reads or writes, as construct definitions (no logic, no I/O).

VT-d structures are built from :mod:`vioasid.formats.bitfields` word tables, so the construct
parser/builder and the hot path's masks come from one definition per layout.
"""
