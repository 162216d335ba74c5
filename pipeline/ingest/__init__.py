"""The indexing job: files in, vectors committed to the catalog.

- plan: the scan compared with the catalog (new, changed, unchanged, aliases);
- jobs: the runner (plan -> engine -> the one writer, committing in batches)
  and the local engine, which decodes in threads ahead of the model;
- engine_ray: the same job's decoding and model on a Ray cluster.

May import retrieval, store, embed, inputs and the bottom modules; never
evaluation, api or the front-ends, which must not import it either.
"""
