"""Data: webdataset shards → COSMOS batches. :mod:`.stream` holds what both backends share (spec, loader
interface, order, skips, checks), :mod:`.recipe` the §4.4 multi-crop recipe, :mod:`.backends` the
torchvision / DALI switch, :mod:`.shards` the shard writer and DALI index files (see README.md)."""
