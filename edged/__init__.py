"""HubMesh (`edged`): a local service mesh daemon for edge boxes."""

__version__ = "0.1.0"
