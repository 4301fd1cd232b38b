"""Subcommands of the ``vioasid`` CLI, one module each (see ``vioasid.cli``)."""
