"""The relay from Alertmanager to GitHub: a degradation alert starts the retrain workflow.

Alertmanager's webhook body is fixed and GitHub's ``repository_dispatch`` wants its own body and
a bearer token, so ``python -m alert_relay`` (``dandelion-alert-relay``) receives the one and
sends the other. ``dispatch`` turns a notification into the dispatch request; ``relay`` is the
HTTP server, its configuration and the call to GitHub. Standard library only: it runs on any
Python 3.11+, the service's container image included (docker-compose.yml).
"""
