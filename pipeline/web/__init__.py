"""The web server of `cbir serve`, a client of the Python API (pipeline/api.py).

- app.py: the Flask app and its routes (pages, thumbnails, JSON API);
- service.py: what routes share: the collection, the one model, caches;
- params.py: a request's search options (k, index, re-ranking, feedback);
- carry.py: an uploaded query carried across a relevance-feedback round;
- auth.py: the token (bearer header or login cookie);
- failures.py: HTTP status by kind of error;
- slots.py: bounded concurrent decodes and decoded pixels;
- redact.py: no server folder in any message;
- load.py: concurrent HTTP clients for the load test and `cbir bench serve`.

pipeline/serve.py runs the app on waitress.
"""

from pipeline.web.app import create_app

__all__ = ["create_app"]
