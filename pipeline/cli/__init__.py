"""The `cbir` command: parse options, call one API function, print.

One module per group of commands: `group` (the `cbir` group itself, its
--debug and the command list), `indexing` (index, build-index), `querying`
(search), `checking` (info, verify), `experiments` (evaluate, train),
`serving` (serve, bench), `watching` (watch), and `options` (the options and parameter types they
share).

Layering (setup.cfg [importlinter]): the CLI is the top layer. It may import
pipeline.api (every call, limit and text of the core it needs is there),
pipeline.inputs, the bottom modules (config, specs, errors, files, faults,
raycluster), and the benchmarks and the web server it starts (bench, web).
It must not import store, embed, retrieval, ingest or evaluation, not even
inside a function (contract "front-ends").
"""

from pipeline.cli.group import main

__all__ = ["main"]
