"""What medbatch offers, one typed function per operation: submit a library or an extract, list
and show jobs, export results, render reports, retry, list studies, verify the audit chain,
start and stop the stack.

The CLI (``medbatch.cli``) and the HTTP API are thin layers over these functions: they parse a
request, call a service and render its plain-data answer, so no query is written twice. Each
function takes the settings and, where the operation is an access to data, the ``actor`` it is
audited under (a user at a terminal, an API token's name).
"""
