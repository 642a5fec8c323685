"""Developer tools that run the service over loopback: the shared test harness, the HTTP
benchmark and the load/soak run. Not part of the service wheel or image (they may import
``training``); run them from a checkout, e.g. ``python -m tools.soak --help``."""
