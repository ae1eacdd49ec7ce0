"""The Triton python-backend side of every model in ``triton_models/``, written once.

* :mod:`triton_torch_adapter.serving`: the base of each ``triton_models/*/1/model.py``
  (``TritonPythonModel``): start-up, DLPack in and out, per-request validation, one forward pass
  per ``execute`` and per-request errors. A model's ``model.py`` adds only what is its own.
* :mod:`triton_torch_adapter.model_files`: a model version directory's files — its
  ``network.py`` loaded by path, its ``weights.pt`` payload — and the state-dict hash that
  training records and the tests check.

It lives outside ``triton_models/`` because Triton takes every directory there for a model. It
needs nothing beyond the standard library, torch and (for ``serving``) Triton's
``triton_python_backend_utils``; importing this package itself imports nothing, so the python
backend stub can find it before ``serving`` puts the site-packages in place.
"""
