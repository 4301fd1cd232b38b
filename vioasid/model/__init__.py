"""Sans-IO logic: guest memory, the VT-d table walker, caches and invalidation, faults, pPASID
allocators and the vPASID policy. Nothing here touches a socket or an event loop."""
