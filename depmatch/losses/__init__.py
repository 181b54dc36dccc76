"""Losses: DepMatch's CDDP and ULDR, and the base frameworks' cross-entropies."""

from depmatch.losses.base import cross_entropy, masked_unlabeled_ce, ohem_cross_entropy
from depmatch.losses.cddp_uldr import cddp_loss, pair_backend, uldr_loss

__all__ = ["cddp_loss", "uldr_loss", "pair_backend", "cross_entropy", "ohem_cross_entropy", "masked_unlabeled_ce"]
