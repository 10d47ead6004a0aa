"""Distributed backup on Ray: fleet mode (every node its own paths) and shard mode (one tree
split over the cluster). The command is ``kdist fleet backup`` (``kdist.cli.fleet``; the script
``cluster/backup.py`` runs it for ``ray submit``); the driver's logic is ``kdist.distributed.driver``,
the actors ``kdist.distributed.workers``, the connection to Ray ``kdist.distributed.connect``."""
