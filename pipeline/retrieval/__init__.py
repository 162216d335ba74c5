"""Indexes and ranking: from stored vectors to ranked results.

Exact search, FAISS factory strings and index files, building, loading and
the automatic choice of an index, sharded and growing IVF indexes, whitening,
`ranking.ranked` (the one ranking function every search and evaluation goes
through), re-ranking and relevance feedback, local-feature verification of a
shortlist, and the retrieval metrics.

Named `retrieval`, not `search`, because `pipeline.search` is the public API
function and a submodule of that name would shadow it. May import store,
embed, inputs and the bottom modules; never ingest, evaluation, api or the
front-ends, which must not import it either.
"""
