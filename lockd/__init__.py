"""lockd: the daemon, its configuration, OS adapters and the command line."""

__version__ = "0.1.0"
