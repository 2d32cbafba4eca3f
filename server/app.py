"""fedtune's Flower ServerApp (``flwr run`` loads ``server.app:app``).

Thin by design: the round loop is ``fedtune.federation.server.run_server``.  The run
configuration arrives as JSON under the run-config key ``fedtune-config``.
"""

from fedtune.apps import make_server_app

app = make_server_app()
