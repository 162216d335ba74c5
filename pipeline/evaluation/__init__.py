"""Measuring retrieval quality, and fine-tuning the model.

Label benchmarks (held-out or leave-one-out queries: mAP, P@1, P@10, per
class), instance benchmarks (a query,relevant ground truth: Holidays mAP,
UKBench N-S), the code both share and the choice between them, the HTML
report, and `cbir train` (the 80/20 fine-tune). Every query is ranked by
`ranking.ranked`, as `cbir search` ranks it.

Named `evaluation`, not `evaluate`, so as not to shadow `pipeline.evaluate`.
May import ingest and every layer below it; never api or the front-ends, which
must not import it either.
"""
