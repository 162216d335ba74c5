"""Pick re-ranking and hybrid parameters by leave-one-out on the catalog alone.

The held-out queries are never looked at: every figure here comes from the
database images querying each other. Usage:

    python scripts/tune_rerank.py --catalog corel.db
"""

from __future__ import annotations

import argparse

from pipeline import api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--index-dir", default="index")
    args = parser.parse_args()
    opts = {"catalog": args.catalog, "index_dir": args.index_dir}

    base = api.evaluate(leave_one_out=True, **opts)["map"]
    print(f"leave-one-out mAP, no re-ranking: {base:.4f}")
    for n in (3, 5, 8, 12, 20):
        for alpha in (1.0, 3.0):
            row = [f"n={n} alpha={alpha:.0f}"]
            for method in ("aqe", "dba", "dba+aqe"):
                m = api.evaluate(
                    leave_one_out=True,
                    rerank=method,
                    rerank_n=n,
                    rerank_alpha=alpha,
                    shortlist=100_000,
                    **opts,
                )["map"]
                row.append(f"{method} {m:.4f}")
            print("  ".join(row), flush=True)
    for w in (0.8, 0.9, 0.95):
        m = api.evaluate(leave_one_out=True, method="hybrid", hybrid_weight=w, **opts)["map"]
        print(f"hybrid weight {w}: {m:.4f}", flush=True)


if __name__ == "__main__":
    main()
