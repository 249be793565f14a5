"""Datamesh Operator: DataProducts on Kubernetes, a discovery catalog and federated queries.

The package is layered; each layer imports only the ones below it (enforced by import-linter,
see pyproject.toml):

- ``cli``, ``local``: entry points and the cluster-less composition.
- ``controller`` (kopf), ``query`` (the federated query service), ``inference`` (the runtime
  server): the three processes; independent of each other.
- ``engine``: the reconciler and the catalog writer, over ports only.
- ``adapters`` (Qdrant, Kubernetes, sources, files, HTTP, embeddings) and ``web`` (what the HTTP
  apps share): the outside world.
- ``settings``; ``core``: pure decisions and the ports; ``resource``: the DataProduct and the
  catalog's wire format.
"""
