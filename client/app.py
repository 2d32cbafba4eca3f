"""fedtune's Flower ClientApp (``flwr run`` loads ``client.app:app``).

Thin by design: the site's logic is ``fedtune.federation.client``.
"""

from fedtune.apps import make_client_app

app = make_client_app()
