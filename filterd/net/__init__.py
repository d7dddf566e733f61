"""Network clients shared by the engine and the MTA: DNS now; nothing here knows about scoring."""

__all__: list[str] = []
