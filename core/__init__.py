"""The ground floor every layer stands on: settings, errors and the registries of job kinds and
served models. It imports nothing of medbatch's own above it (a test checks the layers)."""
