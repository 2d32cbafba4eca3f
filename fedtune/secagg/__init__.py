"""Secure aggregation (SecAgg+, Bell et al. CCS 2020): the server learns only the sum.

Why not Flower's own: flwr 1.42's SecAgg+ expands each 256-bit pairwise seed through a
32-bit seed into NumPy's Mersenne Twister (``secaggplus_utils.pseudo_rand_gen``), which
is not a cryptographic generator (its output reveals its state), draws masks from
[0, M-1) instead of the whole ring, and is tied to the legacy strategy API.  Here masks
are a ChaCha20 keystream keyed by the full 32-byte derived key, uniform over Z_(2^b).

Modules: ``crypto`` (X25519, HKDF, ChaCha20-Poly1305), ``shamir`` (secret sharing),
``masks`` (mask streams and quantisation), ``protocol`` (the site's and the server's
halves of each stage, as plain functions over plain data), ``signing`` (the signed keys
and survivor sets that hold against an active server).
"""
