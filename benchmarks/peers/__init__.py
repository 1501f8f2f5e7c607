"""Peers (TorchServe, BentoML) measured in the same run as ours: see `benchmarks.peers.run`."""

from benchmarks.peers.run import measure_peers, measure_peers_detailed

__all__ = ["measure_peers", "measure_peers_detailed"]
