"""HistoryNet, the bundled trainer: ChromaGAN plus a classification branch over the taxonomy's labels,
a parsing branch and an InfoGAN-style classifier (DESIGN §7), trained from the shards."""
