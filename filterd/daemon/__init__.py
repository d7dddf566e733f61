"""The scoring daemon: a master that forks workers serving the spamd protocol with asyncio."""

__all__: list[str] = []
