"""The site's checks against an active server (Bonawitz et al. CCS 2017 §4/§6, on SecAgg+'s graph).

A server that lies can stand in for every neighbour (forged keys), starve a site of
neighbours so it masks with its self-mask alone, pick a threshold of its liking, or tell
different neighbours different stories about who dropped (split view).  Each check here
closes one of these, from what the site holds itself: the enrolled roster, its own rule
for t, and its neighbours' signatures.  A failure raises
:class:`fedtune.secagg.protocol.RoundAborted` (stage and neighbour index, never data) or a
policy :class:`~fedtune.federation.protocol.Refusal`; either way the site goes no further.
"""

from __future__ import annotations

from fedtune.federation import protocol, wire
from fedtune.privacy.policy import SitePolicy
from fedtune.secagg import protocol as secagg
from fedtune.secagg.signing import Identity, keys_statement, survivors_statement


def least_neighbours(policy: SitePolicy) -> int:
    """The fewest neighbours this site masks with: two (a pair could subtract itself), or its policy's."""
    return max(2, policy.min_other_sites)


def verified_neighbours(identity: Identity, round_number: int, request: wire.ShareRequest, policy: SitePolicy
                        ) -> tuple[dict[int, tuple[bytes, bytes]], dict[int, str]]:
    """The neighbours' keys, each signed by the enrolled site it is listed as, every site at most once.

    Returns ({index: (enc_pk, mask_pk)}, {index: site id}).
    """
    seen = {identity.site_id}
    for j, signed in sorted(request.neighbour_keys.items()):
        if signed.site_id in seen:
            raise secagg.RoundAborted(protocol.STAGE_SHARE, j, "an enrolled site listed twice, or as this site")
        seen.add(signed.site_id)
        statement = keys_statement(identity.federation, round_number, j, signed.site_id, signed.enc_pk,
                                   signed.mask_pk)
        if not identity.verify(signed.site_id, statement, signed.signature):
            raise secagg.RoundAborted(protocol.STAGE_SHARE, j, "its keys are not signed by the enrolled key of the "
                                      "site it is listed as")
    least = least_neighbours(policy)
    if len(request.neighbour_keys) < least:
        raise protocol.Refusal(protocol.REFUSED_POLICY, f"policy.min_other_sites: {len(request.neighbour_keys)} "
                               f"neighbours, fewer than {least}")
    keys = {j: s.keys for j, s in request.neighbour_keys.items()}
    return keys, {j: s.site_id for j, s in request.neighbour_keys.items()}


def check_masking_neighbours(site: secagg.SiteSecrets, received: dict[int, bytes], policy: SitePolicy) -> None:
    """Mask only with at least t (and the policy's minimum) neighbours that shared keys with this site.

    Fewer, and the masked vector would carry too few pairwise masks: with none at all its
    self-mask, which the neighbours reveal, would be all that hides it.
    """
    need = max(site.threshold, least_neighbours(policy))
    if len(received) < need:
        raise secagg.RoundAborted(protocol.STAGE_MASK, None, f"only {len(received)} neighbours shared keys with "
                                  f"this site, fewer than {need}")


def check_survivors(site: secagg.SiteSecrets, survivors: frozenset[int], policy: SitePolicy) -> None:
    """Before signing a survivor set: this site masked, is in it, and enough of its neighbours are.

    A site signs one set per round: a second, different set is the server equivocating.
    """
    stage = protocol.STAGE_CONSISTENCY
    if not site.masked:
        raise secagg.ProtocolViolation("a consistency check before this site masked its input")
    if site.signed is not None and site.signed != survivors:
        raise secagg.RoundAborted(stage, None, "a second, different survivor set in one round")
    if site.index not in survivors:
        raise secagg.RoundAborted(stage, None, "this site's own masked input is missing from the survivors")
    alive = survivors & set(site.neighbour_keys)
    need = max(site.threshold, policy.min_other_sites)
    if len(alive) < need:
        raise secagg.RoundAborted(stage, None, f"only {len(alive)} neighbours survived, fewer than {need}")


def check_survivor_signatures(identity: Identity, site: secagg.SiteSecrets, round_number: int,
                              request: wire.UnmaskRequest) -> None:
    """Reveal only for the set this site signed, and only once t neighbours signed that same set.

    Verification stops at t valid signatures (each costs 0.1 ms on P-256, nearly 1 ms on P-384):
    t is all the guarantee needs, and a forged one met before that aborts the round.
    """
    stage = protocol.STAGE_UNMASK
    if site.signed is None or site.signed != request.survivors:
        raise secagg.RoundAborted(stage, None, "the survivors differ from the set this site signed")
    valid = 0
    for j, signature in sorted(request.signatures.items()):
        if valid >= site.threshold:
            break
        if j not in site.neighbour_keys:
            continue  # only neighbours' signatures count; another site's says nothing about our shares
        statement = survivors_statement(identity.federation, round_number, j, site.neighbour_keys[j][1],
                                        request.survivors)
        if not identity.verify(site.neighbour_sites[j], statement, signature):
            raise secagg.RoundAborted(stage, j, "its signature on the survivor set does not verify")
        valid += 1
    if valid < site.threshold:
        raise secagg.RoundAborted(stage, None, f"{valid} neighbours signed the survivor set, fewer than "
                                  f"{site.threshold}")
