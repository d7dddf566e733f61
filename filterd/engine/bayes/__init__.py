"""The Bayesian classifier: tokenizer, SQLite-backed counts, combiners, and the BAYES_xx check.

    store = BayesStore.open(state_dir / "bayes.sqlite", config.bayes)
    store.learn(parse_message(raw, uri_parser=parser), is_spam=True)
    p = store.spam_probability(msg)          # None until min_spam/min_ham are learnt

`tokenize` shows a message's tokens (for debugging and ``--dump``); `token_ids` gives the hashed
bucket ids that are learnt and scored; `message_digest` is the key a learnt message is known
by. The combiner (SpamAssassin's chi-square by default) was chosen by
``scripts/bayes-experiment``; see `classifier` for the alternatives.
"""

from filterd.engine.bayes.autolearn import autolearn_decision
from filterd.engine.bayes.check import BayesCheck, bayes_rules
from filterd.engine.bayes.store import BayesStore, LearnResult, StoreError
from filterd.engine.bayes.tokenizer import message_digest, token_hashes, token_ids, tokenize

__all__ = [
    "BayesCheck",
    "BayesStore",
    "LearnResult",
    "StoreError",
    "autolearn_decision",
    "bayes_rules",
    "message_digest",
    "token_hashes",
    "token_ids",
    "tokenize",
]
