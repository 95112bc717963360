"""Clients of OpenAI-compatible servers: many servers spread by load, failover, timeouts.

Used by `eval --endpoint` and `build-data --teacher URL` (`parathinker.client.endpoints`).
"""
