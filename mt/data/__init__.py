"""Stage 1, data: corpora read as sentence pairs (sources), cleaned, tokenized with SentencePiece
(tokenizer) and cached as token-id arrays (prepare), which training memory-maps (dataset)."""
