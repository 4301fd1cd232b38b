"""What the socket protocols share: framing with fd attribution (:mod:`.framing`) and the
non-blocking SCM_RIGHTS transport on the asyncio loop (:mod:`.transport`)."""
