"""Data: corpus → token shards (`prepare`), pretraining batches, SFT formats and collation."""
