"""knotd: the daemon that runs the Knotencheck voice agent."""

__version__ = "0.1.0"
