"""convertr-watcher: change notifications for the Convertr lead-generation API."""

__version__ = "0.1.0"
