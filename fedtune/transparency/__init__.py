"""The transparency record of each adapter version: what shaped it, never what was in the data.

:mod:`.digests` hashes an adapter's files into its record; :mod:`.content` adds what the
server knows of a round (method, software, each site's ε and disclosed manifest);
:mod:`.card` renders ``ADAPTER_CARD.md`` beside ``adapter_record.json``; :mod:`.verify`
is ``fedtune record verify DIR``.  A site's own half (its manifest and commitments) is
:mod:`fedtune.deploy.manifest`; the server reads it strictly (:mod:`.disclosure`).
"""
