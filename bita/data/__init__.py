"""Caption data: annotation readers, image loading, WebDataset shards and the training/eval streams.

Official annotations + images --tools/make_shards.py--> ``<root>/<dataset>/<split>/*.tar`` and a
manifest; ``bita.data.stream`` turns those shards into batches (see the contract).
"""
