"""`cbir bench ...`: measurements that print figures.

- extract: indexing throughput against the model alone, and `bench scale`
  (index build time, memory, QPS and recall per size);
- bigjpeg: `bench extract --big`, 12-megapixel JPEGs against the same photos small;
- scores: what a score means (pair-score quantiles) and flat against adaptive cut-offs;
- synth: synthetic vectors made from real features, for `bench scale`;
- shards: a sharded on-disk build against a single-shot one;
- distributed: the Ray engine against the local one, the driver's commits;
- serve: requests/s, p50 and p99 of a real local web server;
- edits, duplicates, duplicates_scale: precision and recall of `cbir duplicates`
  on edited copies made with Pillow, and its time at up to a million vectors.
- verify: what local-feature verification of the top N gains on Holidays, UKBench,
  Corel and edited copies, and its seconds per query.

May import web, api and every layer below them; only cli may import it.
"""
