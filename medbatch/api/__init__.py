"""The HTTP API (FastAPI): submissions, jobs, results, reports, studies, health and metrics
under scoped bearer tokens, and the operator console. Routes are thin over
``medbatch.services``, the same functions the CLI calls."""
