"""Stage 3, translation: greedy and beam search on the model (search), the Translator that turns lines
into translations under the text contract (translator, lines), attention and word alignment
(alignment), and scoring with sacreBLEU (evaluate)."""
