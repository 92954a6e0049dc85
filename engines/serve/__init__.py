"""The HTTP server (``planforge serve``): OpenAI's ``/v1`` for decoder bundles, the Open Inference Protocol
``/v2`` for every other bundle, ``/metrics`` for Prometheus. A room of its own: it imports the runtime, never
the reverse. Protocol modules (``openai_api``, ``kserve``) only translate JSON to requests and back; the
scheduling (continuous batching, the dynamic batcher) stays in ``engines.runtime``. Needs the ``serve``
extra (starlette, uvicorn, jinja2, prometheus-client)."""
