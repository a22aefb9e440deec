"""Everything that awaits: listeners, upstream pools, the proxy handler, admin, lifecycle.

Imports: sidecar.core, sidecar.config, sidecar.errors, aiohttp, prometheus_client, stdlib.
"""
