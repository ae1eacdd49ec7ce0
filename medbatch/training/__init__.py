"""Helpers shared by the reference models' training scripts (``triton_models/*/train.py``) and
their tests.

They live here, not next to the models, because Triton treats every directory under
``triton_models/`` as a model. Nothing in this package imports torch or scikit-learn at import
time (workers import ``medbatch`` and must never pull torch in); the functions that need them
import them when called.
"""
