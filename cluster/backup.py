"""Fleet-wide or sharded backup on a Ray cluster into one kdist repository.

    ray submit cluster/aws.yaml cluster/backup.py -- --repo s3://bucket/kdist --mode fleet --path /home
    ray job submit -- python cluster/backup.py --repo s3://bucket/kdist --mode shard --path /mnt/shared/data

``ray submit`` copies only this file: kdist itself must be installed on every node (the setup
commands in cluster/aws.yaml and cluster/local.yaml do it). ``python cluster/backup.py --help``
lists the options; cluster/README.md walks through a nightly setup.
"""

from kdist.distributed.driver import main

if __name__ == "__main__":
    main()
