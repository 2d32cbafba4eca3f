"""The round protocol of DESIGN.md as plain functions over Flower messages.

``server/app.py`` and ``client/app.py`` only wire Flower's ServerApp and ClientApp
to :mod:`fedtune.federation.server` and :mod:`fedtune.federation.client`; the same
code runs in simulation and in deployment.
"""
