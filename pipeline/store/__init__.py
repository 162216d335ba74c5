"""The truth of a collection: the SQLite catalog and the vector file.

The catalog's schema and migrations, row checksums, connections, the one write
path and the one-writer lock; the append-only vector file with a CRC-32 per
row; `Collection`, the one object for an open collection (opening for reading
or writing, repair on open, the fingerprint check, damaged rows).

May import embed, inputs and the bottom modules; never retrieval or anything
above (indexes are derived from the store, not the other way round). The
front-ends (cli, web) must not import it; they go through pipeline.api.
"""
