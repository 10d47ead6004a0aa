"""Fleet-wide or sharded backup on a Ray cluster into one kdist repository: ``kdist fleet backup``.

    ray submit cluster/aws.yaml cluster/backup.py -- --address auto --repo s3://bucket/kdist --mode fleet --path /home
    ray job submit -- python cluster/backup.py --repo s3://bucket/kdist --mode shard --path /mnt/shared/data

``ray submit`` copies only this file: kdist itself must be installed on every node (the setup
commands in cluster/aws.yaml and cluster/local.yaml do it). It takes the options of
``kdist fleet backup`` (``python cluster/backup.py --help``); cluster/README.md walks through a
nightly setup.
"""

import sys

from kdist.cli.main import main

if __name__ == "__main__":
    sys.argv[1:1] = ["fleet", "backup"]
    main()
