"""The small relay MTA: SMTP server (smtpd), pre-queue milter client, durable queue, delivery.

Layering: may use filterd.protocols, filterd.config, filterd.net, filterd.errors and
filterd.dkimsign; never the engine, the daemon or the CLI (the filter is reached over the
milter protocol, exactly as Postfix reaches it).
"""

__all__: list[str] = []
