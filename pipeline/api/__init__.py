"""The Python API: the one facade that the CLI, the web app and the benchmarks call.

Every function takes the same keyword options as the CLI flags (catalog,
index_dir, weights, k, index, ...), merged over a config file (`config=`),
CBIR_* variables and the defaults, exactly as the CLI merges them. The
`*_in` variants take an open `Collection` and an embedder instead, for
clients that keep them open (the web server).

One module per job: `models` (which model a command uses, loaded once per
process by `cached_embedder`), `indexing` (index), `searching` (search,
search_in), `building` (build_index, update_indexes), `checks` (info,
verify), `editing` (add_uploads, remove_images: images one at a time, as a
server adds them), `dedup` (duplicates, and moving them: move_duplicates,
undo_moves), `experiments` (evaluate, train), `watching` (watch: keep a
catalog up to date with its folders), and `frontends` (the limits,
parsers and texts of the core that the front-ends show).

Layering (setup.cfg [importlinter]): the API may import every layer below it
(evaluation, ingest, retrieval, store, embed, inputs, and config, errors,
files, faults, raycluster), never the front-ends above it (web, bench, cli).
Its modules import one another by their own names (`pipeline.api.models`),
never this facade, which would make a circle. pipeline.cli and pipeline.web
reach the core only through the names below (contract "front-ends").

A test that stands in for the model patches `pipeline.api.models.cached_embedder`,
where the API looks it up, not the name re-exported here.
"""

from pipeline.api.building import build_index, update_indexes
from pipeline.api.checks import info, info_in, verify
from pipeline.api.dedup import (
    KIND_NAMES,
    duplicates,
    duplicates_in,
    duplicates_report,
    move_duplicates,
    undo_moves,
    write_move_plan,
)
from pipeline.api.dedup_export import chosen_moves
from pipeline.api.dedup_export import write_csv as write_duplicates_csv
from pipeline.api.editing import add_uploads, check_upload, remove_images
from pipeline.api.experiments import evaluate, train
from pipeline.api.explain_pictures import render_heatmap, render_matches, render_result
from pipeline.api.explaining import (
    Explanation,
    explain,
    explain_in,
    explanation_in,
    explanations,
)
from pipeline.api.frontends import (
    DEFAULT_SHRINKAGE,
    DEFAULT_WHITEN_DIM,
    MAX_SHARDS,
    SHRINKAGE_SPEC,
    WHITEN_DIM_SPEC,
    describe_model,
    describe_update,
    describe_whitening,
    parse_params,
    parse_size,
    whitening_note,
    write_report,
)
from pipeline.api.indexing import index
from pipeline.api.models import (
    cached_embedder,
    calibration_for,
    descriptor_for,
    embedder_args,
    embedder_for,
    model_choice,
    model_loader,
    open_collection,
    producer_choice,
    settings_for,
    with_descriptor,
)
from pipeline.api.searching import Filter, Pixels, Query, Upload, make_filter, search, search_in
from pipeline.api.watching import Batch, watch

__all__ = [
    "DEFAULT_SHRINKAGE",
    "DEFAULT_WHITEN_DIM",
    "Filter",
    "KIND_NAMES",
    "MAX_SHARDS",
    "SHRINKAGE_SPEC",
    "WHITEN_DIM_SPEC",
    "Batch",
    "Explanation",
    "Pixels",
    "Query",
    "Upload",
    "add_uploads",
    "build_index",
    "cached_embedder",
    "calibration_for",
    "check_upload",
    "chosen_moves",
    "describe_model",
    "describe_update",
    "describe_whitening",
    "descriptor_for",
    "duplicates",
    "duplicates_in",
    "duplicates_report",
    "embedder_args",
    "embedder_for",
    "evaluate",
    "explain",
    "explain_in",
    "explanation_in",
    "explanations",
    "index",
    "info",
    "info_in",
    "make_filter",
    "model_choice",
    "model_loader",
    "move_duplicates",
    "open_collection",
    "parse_params",
    "parse_size",
    "producer_choice",
    "remove_images",
    "render_heatmap",
    "render_matches",
    "render_result",
    "search",
    "search_in",
    "settings_for",
    "train",
    "undo_moves",
    "update_indexes",
    "verify",
    "watch",
    "whitening_note",
    "with_descriptor",
    "write_move_plan",
    "write_duplicates_csv",
    "write_report",
]
