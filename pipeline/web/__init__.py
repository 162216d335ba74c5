"""The web server of `cbir serve`, a client of the Python API (pipeline/api/).

It reaches the collection and the model only through `pipeline.api` and its
long-lived reader, `pipeline.api.session.Session`; what is here is HTTP.
A front-end: it may import api, inputs and the bottom modules (errors, files,
config, specs, faults, raycluster), never evaluation, ingest, retrieval,
store or embed, not even inside a function (setup.cfg [importlinter],
contract "front-ends"); only bench and cli may import it.

- app.py: the Flask app and its routes (pages, thumbnails, JSON API);
- service.py: what routes share: the API's session, decode slots, thumbnails;
- params.py: a request's search options (k, index, re-ranking, feedback);
- dedup_routes.py, dedup_params.py: the review page of duplicates and its options;
- carry.py: an uploaded query carried across a relevance-feedback round;
- auth.py: the token (bearer header or login cookie);
- failures.py: HTTP status by kind of error;
- slots.py: bounded concurrent decodes and decoded pixels;
- redact.py: no server folder in any message;
- load.py: concurrent HTTP clients for the load test and `cbir bench serve`.

server.py runs the app on waitress (`cbir serve`).
"""

from pipeline.web.app import create_app

__all__ = ["create_app"]
