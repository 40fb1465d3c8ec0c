"""cambium.screener — live crypto in-play screener (read-only): features → model → score → top-K ranker → notifiers.

See docs/screener.md for the pipeline and docs/screener/contracts.md for the wire contracts.
"""
