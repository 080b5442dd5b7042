"""Data: the shard format, vocabularies, the training stream, the exactly-once evaluation reader, image folders."""
