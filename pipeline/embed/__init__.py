"""Pixels to unit vectors: the embedder interface and its runtimes.

The interface (a Protocol, pooling, fingerprints), the descriptor (input,
scales, pooling), choosing and loading a runtime (Keras, OpenVINO at fp32,
bf16 or int8, with its calibration and model cache), CPU features, and the
colour-histogram baseline. Only the runtime modules import a framework, and
only when a model is built.

May import inputs and the bottom modules; never store, retrieval or anything
above: a model knows nothing of catalogs. The front-ends (cli, web) must not
import it; they get vectors through pipeline.api.
"""
