"""Distributed backup on Ray: fleet mode (every node its own paths) and shard mode (one tree
split over the cluster). The driver is ``cluster/backup.py`` (``kdist.distributed.driver``)."""
