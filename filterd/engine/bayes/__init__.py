"""The Bayesian classifier: tokenizer, a store of counts (SQLite, or Redis for several machines),
combiners, and the BAYES_xx check.

    store = open_bayes_store(config, state_dir)     # the backend config.state names
    store.learn(parse_message(raw, uri_parser=parser), is_spam=True)
    p = store.spam_probability(msg)          # None until min_spam/min_ham are learnt

`BayesStore` (SQLite) and `RedisBayesStore` share `BayesStoreBase`: the same operations and
guarantees, scoring from counts mirrored in memory. `tokenize` shows a message's tokens (for
debugging and ``--dump``); `token_ids` gives the hashed bucket ids that are learnt and scored;
`message_digest` is the key a learnt message is known by. The combiner (SpamAssassin's
chi-square by default) was chosen by ``scripts/bayes-experiment``; see `classifier` for the
alternatives.
"""

from typing import TYPE_CHECKING

from filterd.engine.bayes.backend import open_bayes_store, open_existing_bayes_store
from filterd.engine.bayes.base import BayesStoreBase, LearnResult, StoreError
from filterd.engine.bayes.store import BayesStore
from filterd.engine.bayes.tokenizer import message_digest, token_hashes, token_ids, tokenize

if TYPE_CHECKING:
    from filterd.engine.bayes.autolearn import autolearn_decision
    from filterd.engine.bayes.check import BayesCheck, bayes_rules
    from filterd.engine.bayes.redis_store import RedisBayesStore

__all__ = [
    "BayesCheck",
    "BayesStore",
    "BayesStoreBase",
    "LearnResult",
    "RedisBayesStore",
    "StoreError",
    "autolearn_decision",
    "bayes_rules",
    "message_digest",
    "open_bayes_store",
    "open_existing_bayes_store",
    "token_hashes",
    "token_ids",
    "tokenize",
]


def __getattr__(name: str) -> object:
    # Imported on first use: the redis client costs ~0.1 s and only sites with state.backend
    # redis need it; the check and autolearn bring the engine's plugin machinery and asyncio,
    # which `filterd learn` (started per run, often from cron) does not use.
    if name == "RedisBayesStore":
        from filterd.engine.bayes.redis_store import RedisBayesStore

        return RedisBayesStore
    if name in ("BayesCheck", "bayes_rules"):
        from filterd.engine.bayes import check

        return getattr(check, name)
    if name == "autolearn_decision":
        from filterd.engine.bayes.autolearn import autolearn_decision

        return autolearn_decision
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
