"""Data: webdataset shards → COSMOS batches (see :mod:`.backends` for the torchvision / DALI switch,
:mod:`.shards` for the shard writer and DALI index files)."""
