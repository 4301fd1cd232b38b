"""The vioasid daemon: an asyncio unix-socket server around the sans-IO engine.

``codec`` frames and parses the wire protocol (sans-IO), ``transport`` moves bytes and fds over a
non-blocking socket, ``session`` is one client connection's state, ``service`` maps requests onto
the engine, ``server`` ties them together.
"""
