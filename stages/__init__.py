"""Stage orchestration: encode, train, sample, eval and the end-to-end demo (config -> run)."""
