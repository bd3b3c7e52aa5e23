"""HistoryNet, the bundled trainer: ChromaGAN plus a classification branch over the taxonomy's labels,
a parsing branch and an InfoGAN-style classifier (the paper's networks, ported from the official Keras
code), trained from the shards `mhmd shard` writes."""
