"""ffnskip serving: a Ray Serve application speaking the OpenAI HTTP API with a tuned skip policy.

Layering: ``ffnskip`` (core) <- ``tuning`` (store) <- ``serve``. Only :mod:`serve.deployment`,
:mod:`serve.app` and :mod:`serve.cli` import Ray; the protocol (:mod:`serve.protocol`), the
batching engine loop (:mod:`serve.engine_loop`), the request service (:mod:`serve.service`) and
the FastAPI routes (:mod:`serve.http`) are plain Python, testable without a cluster.
"""
