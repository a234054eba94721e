"""Fixed ids of the special tokens, the same in every SentencePiece model we train."""

PAD = 0  # padding, ignored by the loss and masked in attention
UNK = 1  # unknown piece
BOS = 2  # begins every decoder input
EOS = 3  # ends every source sentence and every target
