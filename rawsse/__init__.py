"""rawsse: an APNs-compatible push simulator that delivers pushes to simulated devices over SSE."""

__version__ = "0.1.0"
