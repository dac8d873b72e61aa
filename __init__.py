"""edgepatch: on-device learning across a fleet (see README.md and docs/)."""

__version__ = "0.1.0"
