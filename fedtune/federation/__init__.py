"""The rounds of DESIGN.md over Flower messages: the server's loop, the round protocols, the site.

``server/app.py`` and ``client/app.py`` only wire Flower's ServerApp and ClientApp
to :mod:`fedtune.federation.server` and :mod:`fedtune.federation.client`; the same
code runs in simulation and in deployment.

Server side, one job per module: ``server`` (the loop, a short recipe), ``membership``
(discover sites, notice who came back), ``scheduling`` (who can afford the next round),
``rounds`` (the RoundProtocol interface), ``plain_server`` and ``secure_server`` (its two
implementations), ``versions`` (checkpoint and adapter records), ``evaluator`` (held-out
evaluation on a background thread), ``run_files`` (metrics lines, crash recovery),
``report`` (privacy report and summary).  Both sides: ``protocol`` (round config, fixed
codes), ``wire`` (typed secure-aggregation records), ``exchange`` (one round trip).  Site
side: ``client`` and ``secure_client``.
"""
