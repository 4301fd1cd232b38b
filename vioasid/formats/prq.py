"""Page request descriptor (VT-d §9.11), written by the IOMMU into the page-request queue.

Mirrors Linux ``struct page_req_dsc`` (drivers/iommu/intel/prq.c) and QEMU ``VTD_PRD_*``. The
page-group response the guest answers with is ``invalidation.PGRESP_DESC``.
"""

from .bitfields import F, Layout, Word

PAGE_REQ_DESC_SIZE = 32

PAGE_REQ_DESC = Layout(
    "page_request_descriptor",
    [
        Word(
            "qw0",
            [
                F("TYPE", 7, 0),  # VTD_PRD_TYPE = 1
                F("PP", 8),
                F("PDP", 9),
                F("RID", 31, 16),
                F("PASID", 51, 32),
                F("ER", 52),
                F("PM", 53),
            ],
        ),
        Word(
            "qw1",
            [F("RD", 0), F("WR", 1), F("LPIG", 2), F("PRGI", 11, 3), F("ADDR", 63, 12, addr=True)],
        ),
        Word("qw2", [F("PRIV_DATA0", 63, 0)]),
        Word("qw3", [F("PRIV_DATA1", 63, 0)]),
    ],
    doc="VT-d §9.11 page request descriptor; Linux struct page_req_dsc, QEMU VTD_PRD_*.",
)
