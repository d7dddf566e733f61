"""The local delivery agent, `filterd deliver`: one message for one user into a Maildir or an
mbox, asking the daemon first (over the spamd protocol, as spamc would) and sorting by the
user's recipes.

`recipes` parses and evaluates recipe files (pure), `maildir` and `mbox` store messages
durably, `main` is the command. This package reaches the daemon only through
`filterd.client`, never by importing the engine or the daemon.
"""

__all__: list[str] = []
