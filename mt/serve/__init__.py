"""Stage 4, serving: the batcher, its limits and engines (batcher), the HTTP app and its guards (app),
a checkpoint's decoder process (decoder_process) and the page (page.html)."""
