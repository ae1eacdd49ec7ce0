"""``python -m medbatch.cli``: how the embedded stack starts the listener in its own process."""

from medbatch.cli import app

app()
